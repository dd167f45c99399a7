"""The logistic head: multinomial L2 logistic regression on standardised features, its C
chosen on validation along a warm-started path (`logistic_path`), in memory or streamed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..device import resolve_device
from ..errors import HeadError
from .base import NetworkHead, Standardize, parameter_grid
from .logistic_path import Standardization, fit_logistic_path, fit_logistic_path_cpu, validate_linear


logger = logging.getLogger("featurecache")

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 4, 12))
# C outside these overflowed: 1 / C in float64 below 1e-308 (a NaN gradient), the loss term's weight in the bias
# solve above 5e307 (a traceback); near 1e-300 the streamed fit diverged. Both paths were tried at the bounds.
C_RANGE = (1e-30, 1e30)


FOLD_LIMIT = 30.0  # largest |mean| / scale of a feature for which the CPU solver reads raw features


def _solver_features(network: nn.Sequential, X: np.ndarray,
                     device: torch.device) -> tuple[np.ndarray | Tensor, Standardization | None]:
    """What the solver reads, and the standardisation it folds into its products (None: the
    features given are standardised already).

    On the CPU the solver reads the raw float32 features and folds (x - mean) / scale into
    the weights: no standardised copy of X (120 ms and 245 MB on 30,000 x 2048, measured).
    Not when a feature's mean exceeds FOLD_LIMIT times its
    scale, where float32 products of raw values would lose that many times more digits to
    the mean: then a float32 NumPy copy, standardised (4x faster than torch's elementwise
    ops on the CPU, measured). Elsewhere a standardised tensor on `device`."""
    if device.type != "cpu":
        return network.standardize.to(device)(torch.from_numpy(X).to(device)), None
    mean, scale = network.standardize.mean.numpy(), network.standardize.scale.numpy()
    if np.max(np.abs(mean) / scale, initial=0.0) <= FOLD_LIMIT:
        return X, Standardization(mean.astype(np.float64), 1.0 / scale.astype(np.float64))
    out = np.subtract(X, mean, dtype=np.float32)
    out /= scale
    return out, None


class LogisticHead(NetworkHead):
    """Multinomial L2 logistic regression on standardised features, full-batch L-BFGS.

    `C` fixes the inverse regularisation strength (sklearn's scaling); without it the
    `Cs` grid (default 12 values in 1e-4..1e4) is fitted as one warm-started path, from
    strong to weak regularisation, each C with `sweep_max_iter` L-BFGS iterations. The
    path stops early once validation accuracy has not improved for `patience` Cs in a
    row (None: fit every C); weaker regularisation only overfits further. The C with the
    best validation accuracy (then log-loss) is then polished to convergence
    (`max_iter`) on all rows. `refit` retrains the chosen C on train+val.

    `sweep_rows` bounds the training rows that select C ("auto": 4,096, or 80 per class
    if more; None: all rows). With more rows than that, the path runs on a fixed random
    subsample, with the penalty scaled for the full row count (a subsample's mean loss
    estimates the full one), validated on the whole validation split; only the chosen C
    is then solved on every row, warm-started from its subsample solution. Selection
    costs a fraction of one full fit, and the chosen C's solution is the exact optimum
    on all rows, to `tol`, as with a single C (a warning says when `max_iter` stops a
    solve first).

    `sweep_tol` is the gradient tolerance of the selection path (default None: 10 x
    `tol`). Selection only ranks Cs by validation accuracy, which settles well before the
    gradient reaches `tol`: on 50,000 x 2048 features it cut the path's evaluations 3x
    (50 to 16 at 100 classes) and chose the same C; the chosen C's final solve still
    runs to `tol`.
    `sweep_` records each C's validation scores; a weaker C whose path was already within
    `sweep_tol` keeps the previous C's model, which its `same_model_as` names.

    Streamed from disk (features over the memory budget), the same `C` or `Cs` are
    trained together by minibatch Adam, `stream_epochs` passes of `stream_batch_size`
    rows at `stream_lr`, and C is chosen on the cache's val split; `max_iter`, `tol`,
    `patience`, `sweep_rows`, `sweep_tol` and `sweep_max_iter` apply in memory only.
    """

    name = "logistic"
    _saved_attributes = ("best_params_", "sweep_", "sweep_rows_")
    SWEEP_TOL_FACTOR = 10.0  # sweep_tol=None: the selection path stops at this multiple of tol

    def __init__(self, *, C: float | None = None, Cs: Sequence[float] | None = None,
                 refit: bool = False, max_iter: int = 100, sweep_max_iter: int = 30,
                 patience: int | None = 3, tol: float = 1e-4, device: str = "auto",
                 n_classes: int | None = None, sweep_rows: int | str | None = "auto",
                 sweep_tol: float | None = None, stream_epochs: int = 10, stream_batch_size: int = 1024,
                 stream_lr: float = 1e-2) -> None:
        self.C = C
        self.Cs = Cs
        self.refit = refit
        self.max_iter = max_iter
        self.sweep_max_iter = sweep_max_iter
        self.patience = patience
        self.tol = tol
        self.device = device
        self.n_classes = n_classes
        self.sweep_rows = sweep_rows
        self.sweep_tol = sweep_tol
        self.stream_epochs = stream_epochs
        self.stream_batch_size = stream_batch_size
        self.stream_lr = stream_lr

    streams = "fit_streaming_logistic"

    def _Cs(self) -> list[float]:
        if self.C is None:
            name, Cs = "Cs", parameter_grid(DEFAULT_CS if self.Cs is None else self.Cs, "Cs")
        elif not np.isscalar(self.C) or isinstance(self.C, (str, bool)):
            raise HeadError(f"C must be one number (use Cs for a grid), got {self.C!r}")
        else:
            name, Cs = "C", parameter_grid(self.C, "C")
        outside = [c for c in Cs if not C_RANGE[0] <= c <= C_RANGE[1]]
        if outside:
            raise HeadError(f"{name} must be between {C_RANGE[0]:g} and {C_RANGE[1]:g}, got {outside[0]!r}")
        return Cs

    def _check_params(self) -> None:
        self._Cs()
        for name in ("max_iter", "sweep_max_iter", "stream_epochs", "stream_batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise HeadError(f"{name} must be a positive integer, got {value!r}")
        if self.patience is not None and not (isinstance(self.patience, int) and not isinstance(self.patience, bool)
                                              and self.patience > 0):
            raise HeadError(f"patience must be a positive integer or None, got {self.patience!r}")
        for name in ("tol", "sweep_tol", "stream_lr"):
            value = getattr(self, name)
            if name == "sweep_tol" and value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise HeadError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.refit, bool):
            raise HeadError(f"refit must be true or false, got {self.refit!r}")
        if not (self.sweep_rows in (None, "auto") or isinstance(self.sweep_rows, int) and self.sweep_rows > 0):
            raise HeadError(f"sweep_rows must be a positive integer, 'auto' or None, got {self.sweep_rows!r}")
        resolve_device(self.device)

    def _selection_rows(self, n: int, n_classes: int) -> int:
        """How many training rows select C (all of them when the bound is not below n)."""
        bound = max(4096, 80 * n_classes) if self.sweep_rows == "auto" else self.sweep_rows
        return n if bound is None or bound >= n else int(bound)

    def _build_network(self, n_features: int, n_classes: int) -> nn.Sequential:
        return nn.Sequential(OrderedDict(
            standardize=Standardize(torch.zeros(n_features), torch.ones(n_features)),
            classifier=nn.Linear(n_features, n_classes),
        ))

    def _solve(self, features, y: np.ndarray, n_classes: int, Cs: list[float], device: torch.device,
               max_iter: int, tol: float, fold: Standardization | None, **options) -> tuple[Tensor, Tensor]:
        """The path over `Cs` on the features of `_solver_features` (NumPy float32 on the CPU)."""
        if device.type == "cpu":
            return fit_logistic_path_cpu(features, y, n_classes, Cs, max_iter=max_iter, tol=tol, standardization=fold,
                                         **options)
        return fit_logistic_path(features, torch.from_numpy(y).to(device), n_classes, Cs, max_iter=max_iter,
                                 tol=tol, **options)

    def _sweep(self, features, y, val_features, y_val, n_classes, Cs, device, fold: Standardization | None,
               penalty_rows: int) -> tuple[int, Tensor, Tensor]:
        """Fit the path with validation watching it; return the best index and the path."""
        val_labels = y_val if isinstance(val_features, np.ndarray) else torch.from_numpy(y_val).to(device)
        scores: dict[int, tuple[float, float]] = {}
        same: dict[int, int] = {}  # a C where the path did not move -> the C whose model it kept
        scored: list = []  # the last model scored, its score and its index

        def stop(index: int, weight: Tensor, bias: Tensor) -> bool:
            if scored and torch.equal(scored[0], weight) and torch.equal(scored[1], bias):
                scores[index], same[index] = scored[2], scored[3]  # within sweep_tol already: same model
            else:
                scores[index] = validate_linear(val_features, val_labels, weight[None], bias[None], fold)[0]
                scored[:] = [weight, bias, scores[index], index]
            best_so_far = max(scores, key=lambda i: (scores[i][0], -scores[i][1]))
            since_best = sum(1 for i in scores if Cs[i] > Cs[best_so_far])
            return self.patience is not None and since_best >= self.patience

        sweep_tol = self.SWEEP_TOL_FACTOR * self.tol if self.sweep_tol is None else self.sweep_tol
        weights, biases = self._solve(features, y, n_classes, Cs, device, self.sweep_max_iter, sweep_tol, fold,
                                      stop=stop, penalty_rows=penalty_rows)
        self.sweep_ = [{"C": C, "val_top1": scores[i][0] if i in scores else None,
                        "val_log_loss": scores[i][1] if i in scores else None,
                        "fitted": i in scores, "same_model_as": Cs[same[i]] if i in same else None}
                       for i, C in enumerate(Cs)]
        best = max(scores, key=lambda i: (scores[i][0], -scores[i][1]))
        unmoved = f" ({len(same)} kept the previous C's model: already within sweep_tol {sweep_tol:.2g})" if same else ""
        logger.info("logistic: chose C=%.3g (val top-1 %.4f); %d of %d Cs fitted on %d rows%s",
                    Cs[best], scores[best][0], len(scores), len(Cs), len(y), unmoved)
        return best, weights, biases

    def _fit(self, X, y, X_val, y_val, n_classes: int) -> None:
        Cs = self._Cs()
        if len(Cs) > 1 and X_val is None:
            raise HeadError("logistic sweep needs validation data (or pass a single C)")
        device = resolve_device(self.device)
        network = self._standardized_network(X, n_classes)
        features, fold = _solver_features(network, X, device)  # once: the sweep and the polish share it
        start, self.sweep_, self.sweep_rows_ = None, [], None
        best = 0
        if len(Cs) > 1:
            rows = self._selection_rows(len(y), n_classes)
            subset = (slice(None) if rows == len(y)
                      else np.sort(np.random.default_rng(0).permutation(len(y))[:rows]))
            sample = features[subset] if isinstance(features, np.ndarray) or rows == len(y) else \
                features[torch.from_numpy(subset).to(device)]
            val_features, val_fold = _solver_features(network, X_val, device)  # decided as for X: same statistics
            best, weights, biases = self._sweep(sample, y[subset], val_features, y_val, n_classes, Cs, device,
                                                val_fold, penalty_rows=len(y))
            start, self.sweep_rows_ = (weights[best], biases[best]), rows
        chosen = Cs[best]
        self.best_params_ = {"C": chosen}
        if self.refit and X_val is not None:
            X, y, start = np.concatenate([X, X_val]), np.concatenate([y, y_val]), None
            network = self._standardized_network(X, n_classes)
            features, fold = _solver_features(network, X, device)
        # Polish the chosen C to convergence on every row, warm-started from its sweep solution.
        weights, biases = self._solve(features, y, n_classes, [chosen], device, self.max_iter, self.tol, fold,
                                      start=start)
        with torch.no_grad():
            network.classifier.weight.copy_(weights[0])
            network.classifier.bias.copy_(biases[0])
        self.network_ = network.cpu().eval()
