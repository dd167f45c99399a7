"""Fitting multinomial L2 logistic regression along a path of C values.

The objective is sklearn's: 0.5 * ||W||^2 + C * sum_i CE_i with the bias unpenalised,
divided by C * N. `fit_logistic_path` runs torch L-BFGS (CUDA); `fit_logistic_path_cpu`
runs an L-BFGS in NumPy with float32 products (CPU), on `SoftmaxObjective`, which prices
steps along a line after one product. `validate_linear` scores many linear models on
validation data at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor

from .lbfgs import dot, lbfgs, shift_penalty

logger = logging.getLogger("featurecache")

BLOCK_ELEMENTS = 2**24  # largest (rows x columns) intermediate computed at once
TINY_PROBABILITY = 1e-30  # below it, float32 probabilities lose digits (normal floats end at 1.2e-38)


class Standardization(NamedTuple):
    """(x - mean) * inverse_scale, folded into a linear model's products on raw features:
    X_std @ W = X @ (inverse_scale * W) - mean . (inverse_scale * W), per class."""

    mean: np.ndarray  # float64 (D,)
    inverse_scale: np.ndarray  # float64 (D,)

    def weights(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(D, C) weights on standardised features as weights on raw ones, and the offset
        (C,) the scores take."""
        raw = weight * self.inverse_scale[:, None]
        return raw, -(self.mean @ raw)


def fit_logistic_path(features: Tensor, labels: Tensor, n_classes: int, Cs: Sequence[float], *,
                      max_iter: int, tol: float,
                      stop: Callable[[int, Tensor, Tensor], bool] | None = None,
                      start: tuple[Tensor, Tensor] | None = None,
                      penalty_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Minimise 0.5 * ||W||^2 + C * sum_i CE_i (bias unpenalised) for every C in `Cs`.

    Returns CPU weights (G, C, D) and biases (G, C) in the order of `Cs`. Each objective
    is divided by C * N (same optimum, sklearn's scaling), so `tol` bounds the gradient
    of a mean cross-entropy plus penalty, as sklearn's lbfgs `tol` does.

    Why a warm-started path rather than one L-BFGS over all G objectives stacked into a
    (D, G, C) tensor: both reach the same optima, but stacking makes every evaluation G
    times as costly while the shared line search waits for the worst-conditioned member.
    Measured on CPU (3000 x 512 features, 20 classes, 12 Cs), the path was 5x faster:
    170 small evaluations against 200 twelve-fold ones. Going from strong to weak
    regularisation, each solve starts near its optimum and needs few iterations.

    `stop(index, weight (C, D), bias)` is called after each C in path order; returning
    True ends the path (the rows of Cs not reached stay NaN). Without `stop`, a C whose
    solve ends with its gradient above `tol` is logged as a warning. `start` warm-starts the
    first solve from a (weight (C, D), bias) pair. `penalty_rows`: as in
    `fit_logistic_path_cpu`.
    """
    n, d = features.shape
    weight = torch.zeros(d, n_classes, device=features.device, requires_grad=True)
    bias = torch.zeros(n_classes, device=features.device, requires_grad=True)
    if start is not None:
        with torch.no_grad():
            weight.copy_(start[0].T)
            bias.copy_(start[1])
    rows = max(1, BLOCK_ELEMENTS // n_classes)
    weights = torch.full((len(Cs), n_classes, d), float("nan"))
    biases = torch.full((len(Cs), n_classes), float("nan"))
    for index in sorted(range(len(Cs)), key=lambda i: Cs[i]):
        strength = 1.0 / (Cs[index] * (penalty_rows or n))
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                                      history_size=10, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = 0.5 * strength * weight.square().sum()
            loss.backward()
            total = loss.detach()
            for start in range(0, n, rows):  # chunks bound the (rows, C) logits
                logits = features[start : start + rows] @ weight + bias
                part = F.cross_entropy(logits, labels[start : start + rows], reduction="sum") / n
                part.backward()
                total = total + part.detach()
            return total

        optimizer.step(closure)
        iterations = optimizer.state[weight].get("n_iter", 0)
        logger.debug("logistic C=%.3g: %d L-BFGS iterations", Cs[index], iterations)
        if stop is None:  # the gradient of the last evaluation, as torch's stopping test reads it
            largest = max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))
            _warn_above_tol(Cs[index], iterations, max_iter, largest, tol)
        weights[index], biases[index] = weight.detach().T.cpu(), bias.detach().cpu()
        if stop is not None and stop(index, weights[index], biases[index]):
            break
    return weights, biases


def _warn_above_tol(C: float, iterations: int, max_iter: int, largest: float, tol: float) -> None:
    """A solve that ended with its gradient above `tol` is not the optimum it promises: say so
    (scikit-learn raises a ConvergenceWarning there). Not along a selection path, whose
    `sweep_max_iter` bounds each C on purpose."""
    if largest <= tol:
        return
    why = f"max_iter={max_iter} reached" if iterations >= max_iter else "no step lowered the loss any further"
    logger.warning("logistic C=%.3g: stopped after %d iterations (%s) with a gradient of %.2g, above tol %.2g: "
                   "the head is not the optimum to tol; raise max_iter (--param max_iter=N) or tol",
                   C, iterations, why, largest, tol)


@functools.cache
def _blas_threads():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _one_blas_thread():
    """BLAS on one thread, for products with a small output (C x C from N x C): OpenBLAS
    splits them across both cores, and on a busy 2-core machine its threads then wait on
    each other: P'P (30,000 x 100) took 680 ms on two threads under load 3, 12 ms on one
    (measured), and made the bias solve cost twice the evaluations' products."""
    return _blas_threads().limit(limits=1, user_api="blas")


class SoftmaxObjective:
    """Mean cross-entropy of softmax(X W + b) plus strength/2 ||W||^2 as a function of W
    alone, and its gradient: for each W the unpenalised bias b is solved exactly (Newton
    on its C variables, from the last b) until its gradient is at most `bias_tol`.

    X is float32 (N, D), standardised, or raw with its `standardization` folded into the
    products (the model is the same); the point is float64 W (D x C, row-major); `bias`
    and `scores` (X W, float32) belong to the point last evaluated or stepped to. Products
    run in float32 with NumPy (OpenBLAS); elementwise passes (softmax) in torch, which
    fuses and threads them (7 ms against NumPy's 26 ms for a (30,000, 100) softmax,
    measured). An evaluation costs two products, X @ W and X.T @ R; a `line` costs one,
    X @ direction, after which each step along it costs a softmax per bias Newton step,
    and the step taken one more product for its gradient.

    Why the bias is solved inside: L-BFGS over W and b together spent its last iterations
    on the bias, whose curvature (no penalty, classes coupled) no diagonal or scalar scaling
    captures. On the benchmark's data (30,000 x 2048, benchmarks.logistic), solves of the
    chosen C from zero and from the subsample's solution took 6 and 11 evaluations at 100
    classes (5 and 5 with the bias inside), 13-14 at 10 classes (7-9 with it).
    By the envelope theorem the gradient in W at the solved b is the joint gradient's W part,
    and the slope along a line the W part's slope.
    """

    NEWTON_STEPS = 50
    MAX_BIAS_STEP = 4.0  # a damped Newton step: no bias moves further than this at once
    REBASE = 8.0  # a bias change spread wider is priced by a softmax pass, not through e^change
    SQUARES_ROWS = 4096

    def __init__(self, features: np.ndarray, labels: np.ndarray, n_classes: int,
                 standardization: Standardization | None = None) -> None:
        self.features, self.labels, self.n_classes = features, labels, n_classes
        self.standardization = standardization
        self.targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        # each row's true class as an index into the flattened (N, C) scores: take() and
        # index_add_() on it cost 0.7 ms on 30,000 x 100, against 1.3-2.1 for [rows, targets]
        self.true_entries = torch.arange(len(labels)) * n_classes + self.targets
        self.minus_ones = torch.full((len(labels),), -1.0)
        self.strength = 0.0
        self.bias = np.zeros(n_classes)
        self.bias_tol = 1e-6
        self.scores: np.ndarray | None = None
        self.residual = np.zeros(n_classes)  # minus the bias gradient at the last bias solved
        self.frequencies = np.bincount(labels, minlength=n_classes) / max(1, len(labels))
        self.bias_steps = self.products = self.softmax_passes = 0
        # The mean square of each (standardised) feature, for the diagonal estimate: 1 where
        # the standardisation's statistics came from these rows (near 1 on a subsample of
        # them), else over at most SQUARES_ROWS rows spread over X; it only sizes a first step.
        if standardization is not None:
            self.squares = np.ones(features.shape[1])
        else:
            sample = features[:: -(-len(features) // self.SQUARES_ROWS)]
            self.squares = np.einsum("nd,nd->d", sample, sample, dtype=np.float64) / max(1, len(sample))
        self.class_curvature = np.full(n_classes, 1.0 / n_classes)

    def diagonal(self) -> np.ndarray:
        """The Hessian's diagonal in W at the point last evaluated, estimated as if each
        feature's square were independent of the probabilities: strength + mean(x_j^2) v_k
        for weight (j, k), with v_k = mean p_k (1 - p_k) from the last evaluation. As
        L-BFGS's initial inverse Hessian it sizes each class's step by its own curvature."""
        return (self.strength + np.outer(self.squares, np.maximum(self.class_curvature, 1e-12))).ravel()

    def __call__(self, point: np.ndarray) -> tuple[float, np.ndarray]:
        self.scores = self._product(point)
        probabilities, loss = self._solve_bias(self.scores)
        # mean p_k (1 - p_k), for `diagonal`: only a solve's first step uses it, and a solve
        # starts with an evaluation (a later C on the path keeps its curvature pairs)
        mean = self.frequencies - self.residual  # mean p_k, summed by the bias solve
        self.class_curvature = mean - probabilities.square().sum(0).double().numpy() / len(self.labels)
        return self._value_and_gradient(point, probabilities, loss)

    def line(self, point: np.ndarray, direction: np.ndarray) -> SoftmaxLine:
        """The objective along point + t * direction, from the point last evaluated."""
        return SoftmaxLine(self, point, direction, self._product(direction))

    def _product(self, point: np.ndarray) -> np.ndarray:
        """X_std @ W for W = point (D x C), in float32."""
        weight = point.reshape(-1, self.n_classes)
        if not weight.any():  # a path starts at zero: its scores are known
            return np.zeros((len(self.labels), self.n_classes), np.float32)
        self.products += 1
        if self.standardization is None:
            return self.features @ weight.astype(np.float32)
        weight, offset = self.standardization.weights(weight)
        scores = self.features @ weight.astype(np.float32)
        scores += offset.astype(np.float32)
        return scores

    def _value_and_gradient(self, point: np.ndarray, probabilities: Tensor, loss: float) -> tuple[float, np.ndarray]:
        """The value and gradient at `point` from its probabilities (made residuals in place)."""
        n = len(self.labels)
        probabilities.view(-1).index_add_(0, self.true_entries, self.minus_ones)  # the residual P - Y
        self.products += 1
        # (R'X)' rather than X'R: the same sums, 125 ms against 150 ms at 30,000 x 2048 x 100
        # and 43 against 82 at 10 classes here (OpenBLAS's kernel for a transposed X is slower)
        gradient = (probabilities.numpy().T @ self.features).T / n
        if self.standardization is not None:  # X_std' R = (X' R - mean (1' R)) / scale
            mean, inverse_scale = self.standardization
            gradient = (gradient + np.outer(mean, self.residual)) * inverse_scale[:, None]  # 1'R / N = -residual
        gradient = gradient.ravel() + self.strength * point
        return loss + 0.5 * self.strength * dot(point, point), gradient

    def _solve_bias(self, scores: np.ndarray) -> tuple[Tensor, float]:
        """Probabilities (N, C) and mean cross-entropy at the bias solved for these scores.

        One softmax pass gives the probabilities P at the bias the solve starts from; a bias
        change d moves them to P e^d / (P e^d) row by row, so the Newton steps after it cost
        a matrix-vector product (the rows' normalisers) and a pass summing P / normalisers
        (the class means), instead of a softmax pass each. The Newton matrix
        is the Hessian where P was computed (a chord method), computed again after a softmax
        pass at the current bias whenever a step fails to halve the residual or d spreads
        beyond REBASE. (Keeping the last solve's Hessian instead saved nothing: the steps
        it added cost what the Hessian did, measured.)"""
        n = len(self.labels)
        scores = torch.from_numpy(scores)
        probabilities = newton = None  # newton: LU factors of the chord's Newton matrix
        factors = normalisers = None  # e^d and P e^d, None while d = 0
        largest, steps = np.inf, 0
        while True:  # a pass after the last step evaluates its bias
            if probabilities is None:
                probabilities = torch.softmax(scores + torch.from_numpy(self.bias.astype(np.float32)), dim=1)
                base, factors = self.bias.copy(), None
                self.softmax_passes += 1
                # torch sums float32 by cascade: 1e-7 relative (a float32 matrix-vector product:
                # 2.6e-5 on 30,000 rows, too coarse for a bias_tol of 1e-7)
                mean = probabilities.sum(0).double().numpy() / n
            self.residual = residual = self.frequencies - mean  # minus the bias gradient
            previous, largest = largest, float(np.max(np.abs(residual)))
            if largest <= self.bias_tol or steps == self.NEWTON_STEPS:
                break
            if largest > 0.5 * previous and factors is not None:  # the chord stalls: start again here
                probabilities = newton = None
                continue
            steps += 1
            self.bias_steps += 1
            if newton is None:
                newton = self._bias_hessian(probabilities, mean)
            step = scipy.linalg.lu_solve(newton, residual)
            self.bias += step * min(1.0, self.MAX_BIAS_STEP / max(float(np.max(np.abs(step))), 1e-300))
            # Raising every bias alike changes no probability, so the Hessian is singular that
            # way and float32 rounding in the residual steps along it: biases drifted together
            # by thousands at tol 1e-6 until float32 scores + bias lost the digits the solve
            # needs. The largest bias is kept at 0 instead.
            self.bias -= self.bias.max()
            change = self.bias - base
            if np.ptp(change) > self.REBASE:  # e^change stays well inside float32 (e^-88 underflows)
                probabilities = newton = None
                continue
            growth = np.exp(change)
            factors = torch.from_numpy(growth.astype(np.float32))
            normalisers = probabilities @ factors  # each row's 100 or so terms: 1e-6 relative at worst
            mean = growth * (probabilities / normalisers[:, None]).sum(0).double().numpy() / n
        if factors is not None:
            probabilities.mul_(factors).div_(normalisers[:, None])
        return probabilities, _cross_entropy(scores, self.bias, probabilities, self.true_entries, self.targets) / n

    @staticmethod
    def _bias_hessian(probabilities: Tensor, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """diag(mean p) - P'P / N, LU-factored for the chord's steps; its null direction
        (all biases up by one) is not in the residual, which sums to zero, so a tiny ridge
        makes it solvable."""
        with _one_blas_thread():
            products = probabilities.numpy()
            hessian = np.diag(mean) - (products.T @ products).astype(np.float64) / len(products)
            hessian[np.diag_indices_from(hessian)] += 1e-9 * max(float(np.trace(hessian)), 1e-12)
            return scipy.linalg.lu_factor(hessian, check_finite=False)


def _cross_entropy(scores: Tensor, bias: np.ndarray, probabilities: Tensor, true_entries: Tensor,
                   targets: Tensor) -> float:
    """The summed cross-entropy of softmax(scores + bias) at `targets` (at `true_entries` of
    the flattened matrix), from its `probabilities`: log p of the true class, exact by
    log_softmax on the rows where p is too small for float32 to carry its digits."""
    true_class = probabilities.view(-1).take(true_entries)
    small = true_class < TINY_PROBABILITY
    log_true = true_class.log()
    if bool(small.any()):
        exact = torch.log_softmax(scores[small] + torch.from_numpy(bias.astype(np.float32)), dim=1)
        log_true[small] = exact.gather(1, targets[small, None])[:, 0]
    return -float(log_true.sum(dtype=torch.float64))


class SoftmaxLine:
    """`SoftmaxObjective` along point + t * direction: the scores of the direction are
    computed once, so each step costs elementwise passes and bias Newton steps only.

    Returns the value and the slope at a step (the bias solved there, from the last step's
    bias); `gradient(t)` moves the objective to the step (its scores and bias) and costs the
    one product X.T @ R. The scores are summed in float32, as X @ W would be computed."""

    def __init__(self, objective: SoftmaxObjective, point: np.ndarray, direction: np.ndarray,
                 along: np.ndarray) -> None:
        self.objective, self.point, self.direction, self.along = objective, point, direction, along
        self.bias = objective.bias.copy()
        self.norms = (dot(point, point), dot(point, direction), dot(direction, direction))  # for the penalty
        self.along_true = float(torch.from_numpy(along).view(-1).take(objective.true_entries).sum(dtype=torch.float64))
        self.priced: tuple | None = None

    def __call__(self, step: float) -> tuple[float, float]:
        objective, n = self.objective, len(self.objective.labels)
        scores = objective.scores + np.float32(step) * self.along
        base, objective.bias = objective.bias, self.bias.copy()  # from the last step's bias
        probabilities, loss = objective._solve_bias(scores)
        self.bias, objective.bias = objective.bias, base  # the objective moves only in gradient()
        self.priced = (step, scores, probabilities, loss, objective.residual)
        ww, wd, dd = self.norms
        along = torch.from_numpy(self.along)
        slope = (float((probabilities * along).sum(1).sum(dtype=torch.float64)) - self.along_true) / n
        value = loss + 0.5 * objective.strength * (ww + 2.0 * step * wd + step * step * dd)
        return value, slope + objective.strength * (wd + step * dd)

    def gradient(self, step: float) -> np.ndarray:
        if self.priced is None or self.priced[0] != step:
            self(step)
        _, scores, probabilities, loss, residual = self.priced
        self.priced = None  # its probabilities become residuals below
        objective = self.objective
        objective.scores, objective.bias, objective.residual = scores, self.bias.copy(), residual
        return objective._value_and_gradient(self.point + step * self.direction, probabilities, loss)[1]


def fit_logistic_path_cpu(features: np.ndarray, labels: np.ndarray, n_classes: int, Cs: Sequence[float], *,
                          max_iter: int, tol: float,
                          stop: Callable[[int, Tensor, Tensor], bool] | None = None,
                          start: tuple[Tensor, Tensor] | None = None,
                          penalty_rows: int | None = None,
                          standardization: Standardization | None = None) -> tuple[Tensor, Tensor]:
    """`fit_logistic_path` on the CPU: L-BFGS in NumPy, products in float32 (OpenBLAS).

    Why not torch here: the CPU torch wheels use MKL, which on AMD processors ran these
    skinny products (6000x2048 by 2048x10) 2.5-7x slower than NumPy's OpenBLAS. Same
    objective, same warm-started path. Along the path the L-BFGS memory is kept too:
    the data term's curvature pairs stay valid when C changes, and the penalty's is
    exact (y += (new - old strength) * s), so a new C starts with a curvature model
    instead of a cautious steepest-descent step.

    `penalty_rows` (default: the rows given) is the N of the penalty 1 / (C N): rows of a
    subsample select C for the full data when it is the full data's row count, since a
    subsample's mean loss estimates the full one. `standardization`: the features are raw
    and the model is fitted on them standardised so (weights and biases for those).
    """
    with _elementwise_threads():
        return _fit_path_cpu(features, labels, n_classes, Cs, max_iter=max_iter, tol=tol, stop=stop, start=start,
                             penalty_rows=penalty_rows, standardization=standardization)


@contextlib.contextmanager
def _elementwise_threads():
    """torch's elementwise passes on one thread while the CPU solver runs, on two cores.

    After each product OpenBLAS's worker thread spins on the other core for a while, and
    torch's second thread then shares that core: every softmax pass waited on it. On two
    cores the whole 100-class sweep of benchmarks.logistic took 1.97-2.30 s with torch on
    one thread against 2.25-2.67 s on two (same process, alternated; 0.79-0.91 s against
    0.92-1.24 s at 10 classes). With more cores, a pass split over them still gains from
    all but one, so they are left as they are (not measured)."""
    threads = torch.get_num_threads()
    if threads != 2:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_path_cpu(features: np.ndarray, labels: np.ndarray, n_classes: int, Cs: Sequence[float], *, max_iter: int,
                  tol: float, stop: Callable[[int, Tensor, Tensor], bool] | None, start: tuple[Tensor, Tensor] | None,
                  penalty_rows: int | None, standardization: Standardization | None) -> tuple[Tensor, Tensor]:
    n, d = features.shape
    objective = SoftmaxObjective(np.ascontiguousarray(features, dtype=np.float32), labels, n_classes,
                                 standardization)
    objective.bias_tol = 0.1 * tol  # the bias is solved well inside the tolerance the weights stop at
    weights = torch.full((len(Cs), n_classes, d), float("nan"))
    biases = torch.full((len(Cs), n_classes), float("nan"))
    point = np.zeros(d * n_classes)
    if start is not None:
        point[:] = start[0].numpy().T.ravel()
        objective.bias[:] = start[1].numpy()
    history: deque | None = None
    known: tuple[float, np.ndarray] | None = None
    for index in sorted(range(len(Cs)), key=lambda i: Cs[i]):
        strength = 1.0 / (Cs[index] * (penalty_rows or n))
        change = strength - objective.strength
        if history:
            history = shift_penalty(history, change)
        if known is not None:  # same W and bias: only the penalty term moves
            known = (known[0] + 0.5 * change * dot(point, point), known[1] + change * point)
        objective.strength = strength
        point, value, gradient, history, iterations = lbfgs(objective, point, max_iter=max_iter, gtol=tol,
                                                            history=history, diagonal=objective.diagonal,
                                                            known=known)
        known = (value, gradient)
        if stop is None:
            _warn_above_tol(Cs[index], iterations, max_iter, float(np.max(np.abs(gradient), initial=0.0)), tol)
        logger.debug("logistic C=%.3g: %d L-BFGS iterations; so far %d products on %d rows, %d bias Newton "
                     "steps, %d softmax passes; max gradient %.2g", Cs[index], iterations, objective.products, n,
                     objective.bias_steps, objective.softmax_passes, np.max(np.abs(gradient)))
        weights[index] = torch.from_numpy(point.reshape(d, n_classes).T.astype(np.float32))
        biases[index] = torch.from_numpy(objective.bias.astype(np.float32))
        if stop is not None and stop(index, weights[index], biases[index]):
            break
    return weights, biases


def validate_linear(features: Tensor | np.ndarray, labels: Tensor | np.ndarray, weights: Tensor,
                    biases: Tensor, standardization: Standardization | None = None) -> list[tuple[float, float]]:
    """(top-1, log-loss) of each of G linear models (weights (G, C, D)) on validation data.

    NumPy features (the CPU path) are scored with NumPy products, tensors with torch; raw
    NumPy features with the models' `standardization` folded in. The softmax passes run in
    torch either way (5 ms against NumPy's 20 on 10,000 x 100 here)."""
    g, n_classes, d = weights.shape
    rows = max(1, BLOCK_ELEMENTS // (g * n_classes))
    if isinstance(features, np.ndarray):
        weights, biases = weights.numpy(), biases.numpy()
        if standardization is not None:
            folded = [standardization.weights(weight.T.astype(np.float64)) for weight in weights]
            weights = np.stack([weight.T for weight, _ in folded])
            biases = np.stack([bias + offset for bias, (_, offset) in zip(biases, folded)]).astype(np.float32)
        stacked = np.ascontiguousarray(weights.reshape(g * n_classes, d).T, dtype=np.float32)  # (D, G*C)
        biases, labels = torch.from_numpy(biases), torch.from_numpy(np.asarray(labels))

        def logits_of(start: int) -> Tensor:
            return torch.from_numpy(features[start : start + rows] @ stacked).view(-1, g, n_classes) + biases
    else:
        weights, biases = weights.to(features.device), biases.to(features.device)

        def logits_of(start: int) -> Tensor:
            return torch.einsum("nd,gcd->ngc", features[start : start + rows], weights) + biases
    correct = torch.zeros(g, dtype=torch.float64, device=biases.device)
    loss = torch.zeros(g, dtype=torch.float64, device=biases.device)
    for start in range(0, len(features), rows):
        chunk_labels = labels[start : start + rows]
        log_probs = torch.log_softmax(logits_of(start), dim=2)
        correct += (log_probs.argmax(dim=2) == chunk_labels[:, None]).sum(dim=0)
        true_class = chunk_labels[:, None, None].expand(-1, g, 1)
        loss -= log_probs.gather(2, true_class).squeeze(2).sum(dim=0, dtype=torch.float64)
    n = len(labels)
    return [(c / n, total / n) for c, total in zip(correct.tolist(), loss.tolist())]
