"""Fitting multinomial L2 logistic regression along a path of C values.

The objective is sklearn's: 0.5 * ||W||^2 + C * sum_i CE_i with the bias unpenalised,
divided by C * N. `fit_logistic_path` runs torch L-BFGS (CUDA); `fit_logistic_path_cpu`
runs an L-BFGS in NumPy with float32 products (CPU). `validate_linear` scores many linear
models on validation data at once.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger("featurecache")

BLOCK_ELEMENTS = 2**24  # largest (rows x columns) intermediate computed at once


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
    True ends the path (the rows of Cs not reached stay NaN). `start` warm-starts the
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
        logger.debug("logistic C=%.3g: %d L-BFGS iterations",
                     Cs[index], optimizer.state[weight].get("n_iter", 0))
        weights[index], biases[index] = weight.detach().T.cpu(), bias.detach().cpu()
        if stop is not None and stop(index, weights[index], biases[index]):
            break
    return weights, biases


def lbfgs(function: Callable[[np.ndarray], tuple[float, np.ndarray]], point: np.ndarray, *, max_iter: int,
          gtol: float, memory: int = 10, history: deque | None = None,
          diagonal: Callable[[], np.ndarray] | None = None,
          known: tuple[float, np.ndarray] | None = None) -> tuple[np.ndarray, float, np.ndarray, deque, int]:
    """Minimise a smooth convex `function` (returning value and gradient) by L-BFGS.

    Stops when the largest gradient entry is at most `gtol` (scipy's and scikit-learn's
    criterion for lbfgs) or after `max_iter` iterations. Backtracking Armijo line search
    with safeguarded quadratic interpolation: on these objectives the unit step is taken
    almost always, so an iteration costs one evaluation. `history` (pairs s, y, 1/s'y)
    may be given to start from curvature learned elsewhere; it is updated in place and
    returned. `diagonal()`, if given, returns an estimate of the Hessian's diagonal at the
    point last evaluated; its inverse gives the first step, taken before any curvature pair
    is known (then the usual scalar s'y / y'y: scaling the diagonal by the pairs instead
    stopped further from the optimum at weak penalties, in tests/test_heads.py). `known`: the
    value and gradient at `point`, when the caller has them (saves an evaluation).
    Returns (point, value, gradient, history, iterations).

    Why not scipy's L-BFGS-B: its bookkeeping, for bounds this problem does not have,
    cost 40 ms a call at 20,000 variables and grows with them (a sixth of the sweep at
    10 classes, measured); the two-loop recursion here costs 4 x memory x n flops.
    """
    history = history if history is not None else deque(maxlen=memory)
    value, gradient = function(point) if known is None else known
    iterations = 0
    while iterations < max_iter and np.max(np.abs(gradient), initial=0.0) > gtol:
        iterations += 1
        inverse = 1.0 / diagonal() if diagonal is not None and not history else None
        direction = -_two_loop(gradient, history, inverse)
        slope = _dot(direction, gradient)
        if slope >= 0:  # not a descent direction (stale curvature): restart as steepest descent
            history.clear()
            direction = -_two_loop(gradient, history, None if diagonal is None else 1.0 / diagonal())
            slope = _dot(direction, gradient)
        step = 1.0
        for _ in range(30):
            trial = point + step * direction
            trial_value, trial_gradient = function(trial)
            if trial_value <= value + 1e-4 * step * slope:
                break
            # Near the optimum, decreases fall below the float32 rounding of the value
            # (~1e-7 relative): accept a step that the slope shows to be good (Hager and
            # Zhang's approximate Wolfe conditions) if the value did not rise beyond that.
            trial_slope = _dot(direction, trial_gradient)
            if (trial_value <= value + 1e-6 * abs(value) and 0.9 * slope <= trial_slope <= -0.8 * slope):
                break
            curvature = trial_value - value - slope * step
            step = min(0.5 * step, max(0.1 * step, -slope * step * step / (2.0 * curvature)))
        else:  # no decrease found: at the precision of float32 products, as scipy stops too
            break
        s, y = trial - point, trial_gradient - gradient
        sy = _dot(s, y)
        if sy > 1e-10 * _dot(y, y):
            history.append((s, y, 1.0 / sy))
        point, value, gradient = trial, trial_value, trial_gradient
    return point, value, gradient, history, iterations


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """a . b without BLAS: OpenBLAS threads a vector dot above 10,000 entries, and on a
    busy 2-core machine waking its threads cost 8 ms a call at 200,000 (einsum: 0.3 ms)."""
    return float(np.einsum("i,i->", a, b))


def _two_loop(gradient: np.ndarray, history: deque, inverse: np.ndarray | None = None) -> np.ndarray:
    """The L-BFGS inverse-Hessian approximation applied to `gradient`; `inverse`, used only
    without history, is a diagonal inverse Hessian for the first step (None: a cautious one)."""
    q = gradient.copy()
    alphas = []
    for s, y, rho in reversed(history):
        alpha = rho * _dot(s, q)
        q -= alpha * y
        alphas.append(alpha)
    if history:
        s, y, _ = history[-1]
        q *= _dot(s, y) / _dot(y, y)
    elif inverse is not None:
        q *= inverse
    else:
        q /= max(1.0, _dot(gradient, gradient) ** 0.5)  # a cautious first step, as scipy takes
    for (s, y, rho), alpha in zip(history, reversed(alphas)):
        q += (alpha - rho * _dot(y, q)) * s
    return q


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

    X is float32 (N, D), standardised; the point is float64 W (D x C, row-major); `bias`
    holds the bias of the point last evaluated. Products run in float32 with NumPy
    (OpenBLAS): two per evaluation, X @ W and X.T @ R; each Newton step on the bias costs
    a softmax of the (N, C) logits already computed and one (C, N) x (N, C) product.

    Why the bias is solved inside: L-BFGS over W and b together spent its last iterations
    on the bias, whose curvature (no penalty, classes coupled) no diagonal or scalar scaling
    captures. On the benchmark's data (30,000 x 2048, benchmarks.logistic), solves of the
    chosen C from zero and from the subsample's solution took 6 and 11 evaluations at 100
    classes (5 and 5 with the bias inside), 13-14 at 10 classes (7-9 with it).
    By the envelope theorem the gradient in W at the solved b is the joint gradient's W part.
    """

    NEWTON_STEPS = 50
    MAX_BIAS_STEP = 4.0  # a damped Newton step: no bias moves further than this at once

    def __init__(self, features: np.ndarray, labels: np.ndarray, n_classes: int) -> None:
        self.features, self.labels, self.n_classes = features, labels, n_classes
        self.rows = np.arange(len(labels))
        self.size = features.shape[1] * n_classes
        self.strength = 0.0
        self.bias = np.zeros(n_classes)
        self.bias_tol = 1e-6
        self.frequencies = np.bincount(labels, minlength=n_classes) / max(1, len(labels))
        self.evaluations = self.bias_steps = 0
        self.squares = np.einsum("nd,nd->d", features, features, dtype=np.float64) / max(1, len(labels))
        self.class_curvature = np.full(n_classes, 1.0 / n_classes)

    def diagonal(self) -> np.ndarray:
        """The Hessian's diagonal in W at the point last evaluated, estimated as if each
        feature's square were independent of the probabilities: strength + mean(x_j^2) v_k
        for weight (j, k), with v_k = mean p_k (1 - p_k) from the last evaluation. As
        L-BFGS's initial inverse Hessian it sizes each class's step by its own curvature."""
        return (self.strength + np.outer(self.squares, np.maximum(self.class_curvature, 1e-12))).ravel()

    def __call__(self, point: np.ndarray) -> tuple[float, np.ndarray]:
        self.evaluations += 1
        n, d = self.features.shape
        weight = point.reshape(d, self.n_classes)
        scores = self.features @ weight.astype(np.float32)
        probabilities, loss = self._solve_bias(scores)
        self.class_curvature = probabilities.mean(axis=0, dtype=np.float64) - np.einsum(
            "nk,nk->k", probabilities, probabilities, dtype=np.float64) / n
        probabilities[self.rows, self.labels] -= 1.0  # the residual P - Y, over N
        probabilities /= n
        gradient = (self.features.T @ probabilities).ravel() + self.strength * point
        return loss + 0.5 * self.strength * _dot(point, point), gradient

    def _solve_bias(self, scores: np.ndarray) -> tuple[np.ndarray, float]:
        """Probabilities (N, C) and mean cross-entropy at the bias solved for these scores."""
        n = len(self.labels)
        for steps in range(self.NEWTON_STEPS + 1):  # the last pass only evaluates the last step's bias
            logits = scores + self.bias.astype(np.float32)
            logits -= logits.max(axis=1, keepdims=True)
            probabilities = np.exp(logits)
            norm = probabilities.sum(axis=1)
            probabilities /= norm[:, None]
            mean = probabilities.mean(axis=0, dtype=np.float64)
            residual = self.frequencies - mean  # minus the bias gradient
            if np.max(np.abs(residual)) <= self.bias_tol or steps == self.NEWTON_STEPS:
                break
            self.bias_steps += 1
            # Hessian diag(mean p) - P'P / N; its null direction (all biases up by one) is
            # not in the residual, which sums to zero, so a tiny ridge makes it solvable.
            with _one_blas_thread():
                hessian = np.diag(mean) - (probabilities.T @ probabilities).astype(np.float64) / n
                hessian[np.diag_indices_from(hessian)] += 1e-9 * max(float(np.trace(hessian)), 1e-12)
                step = np.linalg.solve(hessian, residual)
            self.bias += step * min(1.0, self.MAX_BIAS_STEP / max(float(np.max(np.abs(step))), 1e-300))
        loss = float(np.log(norm, dtype=np.float64).mean() - logits[self.rows, self.labels].mean(dtype=np.float64))
        return probabilities, loss


def fit_logistic_path_cpu(features: np.ndarray, labels: np.ndarray, n_classes: int, Cs: Sequence[float], *,
                          max_iter: int, tol: float,
                          stop: Callable[[int, Tensor, Tensor], bool] | None = None,
                          start: tuple[Tensor, Tensor] | None = None,
                          penalty_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """`fit_logistic_path` on the CPU: L-BFGS in NumPy, products in float32 (OpenBLAS).

    Why not torch here: the CPU torch wheels use MKL, which on AMD processors ran these
    skinny products (6000x2048 by 2048x10) 2.5-7x slower than NumPy's OpenBLAS. Same
    objective, same warm-started path. Along the path the L-BFGS memory is kept too:
    the data term's curvature pairs stay valid when C changes, and the penalty's is
    exact (y += (new - old strength) * s), so a new C starts with a curvature model
    instead of a cautious steepest-descent step.

    `penalty_rows` (default: the rows given) is the N of the penalty 1 / (C N): rows of a
    subsample select C for the full data when it is the full data's row count, since a
    subsample's mean loss estimates the full one.
    """
    n, d = features.shape
    objective = SoftmaxObjective(np.ascontiguousarray(features, dtype=np.float32), labels, n_classes)
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
            history = _shift_penalty(history, change)
        if known is not None:  # same W and bias: only the penalty term moves
            known = (known[0] + 0.5 * change * _dot(point, point), known[1] + change * point)
        objective.strength = strength
        point, value, gradient, history, iterations = lbfgs(objective, point, max_iter=max_iter, gtol=tol,
                                                            history=history, diagonal=objective.diagonal,
                                                            known=known)
        known = (value, gradient)
        logger.debug("logistic C=%.3g: %d L-BFGS iterations, %d evaluations, %d bias Newton steps, "
                     "max gradient %.2g", Cs[index], iterations, objective.evaluations, objective.bias_steps,
                     np.max(np.abs(gradient)))
        weights[index] = torch.from_numpy(point.reshape(d, n_classes).T.astype(np.float32))
        biases[index] = torch.from_numpy(objective.bias.astype(np.float32))
        if stop is not None and stop(index, weights[index], biases[index]):
            break
    return weights, biases


def _shift_penalty(history: deque, change: float) -> deque:
    """Curvature pairs (in W) for a penalty `change` higher: y gains change * s."""
    shifted = deque(maxlen=history.maxlen)
    for s, y, _ in history:
        y = y + change * s
        sy = _dot(s, y)
        if sy > 1e-10 * _dot(y, y):
            shifted.append((s, y, 1.0 / sy))
    return shifted


def validate_linear(features: Tensor | np.ndarray, labels: Tensor | np.ndarray, weights: Tensor,
                    biases: Tensor) -> list[tuple[float, float]]:
    """(top-1, log-loss) of each of G linear models (weights (G, C, D)) on validation data.

    NumPy features (the CPU path) are scored with NumPy products, tensors with torch."""
    if isinstance(features, np.ndarray):
        return _validate_numpy(features, np.asarray(labels), weights.numpy(), biases.numpy())
    g, n_classes, _ = weights.shape
    weights, biases = weights.to(features.device), biases.to(features.device)
    correct = torch.zeros(g, device=features.device)
    loss = torch.zeros(g, device=features.device)
    rows = max(1, BLOCK_ELEMENTS // (g * n_classes))
    for start in range(0, len(features), rows):
        chunk_labels = labels[start : start + rows]
        logits = torch.einsum("nd,gcd->ngc", features[start : start + rows], weights) + biases
        log_probs = torch.log_softmax(logits, dim=2)
        correct += (log_probs.argmax(dim=2) == chunk_labels[:, None]).sum(dim=0)
        true_class = chunk_labels[:, None, None].expand(-1, g, 1)
        loss -= log_probs.gather(2, true_class).squeeze(2).sum(dim=0)
    n = len(labels)
    return [(c / n, total / n) for c, total in zip(correct.tolist(), loss.tolist())]


def _validate_numpy(features: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                    biases: np.ndarray) -> list[tuple[float, float]]:
    g, n_classes, d = weights.shape
    stacked = np.ascontiguousarray(weights.reshape(g * n_classes, d).T, dtype=np.float32)  # (D, G*C)
    correct, loss = np.zeros(g), np.zeros(g)
    rows = max(1, BLOCK_ELEMENTS // (g * n_classes))
    for start in range(0, len(features), rows):
        chunk = labels[start : start + rows]
        logits = (features[start : start + rows] @ stacked).reshape(-1, g, n_classes) + biases
        logits -= logits.max(axis=2, keepdims=True)
        log_norm = np.log(np.exp(logits).sum(axis=2, dtype=np.float64))
        correct += (logits.argmax(axis=2) == chunk[:, None]).sum(axis=0)
        loss += (log_norm - np.take_along_axis(logits, chunk[:, None, None].repeat(g, 1), axis=2)[..., 0]).sum(axis=0)
    n = len(labels)
    return [(float(c) / n, float(total) / n) for c, total in zip(correct, loss)]
