"""The logistic head (multinomial logistic regression on standardised features), and
what every head shares: the `Head` base (scikit-learn estimator contract, input
checks, JSON config) and the `Standardize` layer that carries the training statistics
inside exported modules, so that they take raw features.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted
from torch import Tensor, nn

from ..device import resolve_device
from ..errors import HeadError, MismatchError
from .logistic_path import BLOCK_ELEMENTS, fit_logistic_path, fit_logistic_path_cpu, validate_linear

if TYPE_CHECKING:
    from .streaming import StreamedData

logger = logging.getLogger("featurecache")

STD_FLOOR = 1e-6
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 4, 12))


def jsonable(value: Any) -> Any:
    """`value` with numpy scalars/arrays and tuples turned into JSON types."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: jsonable(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise HeadError(f"{type(value).__name__} value {value!r} cannot be stored in head.json")


def as_features(X: Any, n_features: int | None = None) -> np.ndarray:
    """X as a (N, D) float32 C-contiguous array, checked against `n_features`."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise MismatchError(f"features must be a 2-D (N, D) array, got shape {X.shape}")
    if n_features is not None and X.shape[1] != n_features:
        raise MismatchError(f"head expects {n_features} features, got {X.shape[1]}")
    return np.ascontiguousarray(X, dtype=np.float32)


def as_labels(y: Any, n_rows: int) -> np.ndarray:
    labels = np.asarray(y)
    if labels.shape != (n_rows,):
        raise MismatchError(f"{n_rows} feature rows but labels have shape {labels.shape}")
    if labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise MismatchError("labels must be integer class indices 0..C-1")
    return labels.astype(np.int64)


def standardization(X: np.ndarray) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std (floored at STD_FLOOR) as float32 tensors.

    One pass in float32 blocks of 512 rows, shifted by the mean of 1,024 rows spread over
    X (so the shifted values are small whatever the row order), block sums added in
    float64: 3x less CPU than float64 blocks (90 vs 283 ms on 30,000 x 2048), within
    2e-6 relative of them. (X.std makes an (N, D) float64 temporary: slower still.)"""
    n, block = len(X), 512
    shift = X[:: max(1, n // 1024)].mean(axis=0, dtype=np.float64).astype(np.float32)
    total, squares = np.zeros(X.shape[1]), np.zeros(X.shape[1])
    buffer = np.empty((min(block, n), X.shape[1]), np.float32)
    for start in range(0, n, block):
        centred = np.subtract(X[start : start + block], shift, out=buffer[: min(block, n - start)])
        total += centred.sum(axis=0)
        squares += np.einsum("ij,ij->j", centred, centred)
    offset = total / max(n, 1)
    mean = shift + offset
    std = np.maximum(np.sqrt(np.maximum(squares / max(n, 1) - offset**2, 0.0)), STD_FLOOR)
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32))


def run_in_blocks(function: Callable[[Tensor], Tensor], X: np.ndarray, width: int) -> np.ndarray:
    """`function` over row blocks of a non-empty X, sized so that an intermediate of
    `width` columns stays under BLOCK_ELEMENTS values."""
    rows = max(1, BLOCK_ELEMENTS // max(width, 1))
    blocks = (torch.from_numpy(X[start : start + rows]) for start in range(0, len(X), rows))
    return torch.cat([function(block) for block in blocks]).numpy()


class Standardize(nn.Module):
    """(x - mean) / scale, with the training statistics as buffers."""

    def __init__(self, mean: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("scale", scale.clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.scale


class Head(ClassifierMixin, BaseEstimator):
    """Base of all heads: the sklearn contract plus persistence without pickle.

    Subclasses implement `_fit`, `_predict_proba`, `to_tensors` and `_load_tensors`, and
    list their JSON-able learned attributes in `_saved_attributes`. The class count is
    `n_classes` from `fit`, else from the constructor, else max(y) + 1.
    """

    name: ClassVar[str] = ""
    _saved_attributes: ClassVar[tuple[str, ...]] = ()

    def _check_params(self) -> None:
        """Raise HeadError for bad parameter values (called by fit and make_head)."""

    def check_params(self) -> None:
        """`_check_params`, with a value of the wrong type reported as a HeadError too."""
        try:
            self._check_params()
        except (TypeError, ValueError, AttributeError) as error:
            raise HeadError(f"bad parameters for the {self.name} head: {error}") from None

    def fit(self, X, y, X_val=None, y_val=None, *, n_classes: int | None = None) -> Head:
        self.check_params()
        X = as_features(X)
        y = as_labels(y, X.shape[0])
        if X.shape[0] == 0:
            raise HeadError("cannot fit a head on zero samples")
        if (X_val is None) != (y_val is None):
            raise HeadError("pass both X_val and y_val, or neither")
        if X_val is not None:
            X_val = as_features(X_val, X.shape[1])
            y_val = as_labels(y_val, X_val.shape[0])
        n_classes = n_classes or getattr(self, "n_classes", None) or int(y.max()) + 1
        for labels in (y, y_val):
            if labels is not None and labels.size and labels.max() >= n_classes:
                raise MismatchError(f"label {labels.max()} is out of range for {n_classes} classes")
        self._fit(X, y, X_val, y_val, n_classes)
        self.classes_ = np.arange(n_classes)
        self.n_features_in_ = X.shape[1]
        return self

    def _fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None,
             y_val: np.ndarray | None, n_classes: int) -> None:
        raise NotImplementedError

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = as_features(X, self.n_features_in_)
        if len(X) == 0:
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        return self._predict_proba(X)

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, X) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)

    def to_config(self) -> dict:
        """JSON-able head type, parameters, shapes and chosen hyper-parameters."""
        check_is_fitted(self)
        config = {
            "head": self.name,
            "params": jsonable(self.get_params(deep=False)),
            "n_classes": len(self.classes_),
            "n_features": int(self.n_features_in_),
        }
        for attribute in self._saved_attributes:
            config[attribute] = jsonable(getattr(self, attribute))
        return config

    def to_tensors(self) -> dict[str, Tensor]:
        raise NotImplementedError

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, Tensor]) -> Head:
        """Rebuild a fitted head from `to_config()` and `to_tensors()` output."""
        head = cls(**config["params"])
        head.check_params()
        head.classes_ = np.arange(config["n_classes"])
        head.n_features_in_ = config["n_features"]
        for attribute in cls._saved_attributes:
            setattr(head, attribute, config.get(attribute))
        head._load_tensors(tensors, config)
        return head

    def _load_tensors(self, tensors: dict[str, Tensor], config: dict) -> None:
        raise NotImplementedError

    def as_module(self) -> nn.Module:
        """Module mapping raw float32 features (B, D) to class probabilities (B, C)."""
        raise HeadError(f"the {self.name} head cannot be expressed as a torch module")

    #: True for heads that can fit on features larger than memory, read shard by shard.
    streams: ClassVar[bool] = False

    def fit_streamed(self, data: StreamedData) -> Head:
        """Fit on `data` (a cache split streamed from disk) with this head's own parameters,
        the same ones as in memory; validation is the cache's val split."""
        raise HeadError(f"the {self.name} head cannot stream features from disk")


class NetworkHead(Head):
    """A head whose fitted state is one torch network `network_`: raw features -> logits."""

    def _build_network(self, n_features: int, n_classes: int) -> nn.Sequential:
        raise NotImplementedError

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return run_in_blocks(lambda x: torch.softmax(self.network_(x), dim=1), X, X.shape[1])

    def as_logits_module(self) -> nn.Module:
        """A copy of the network: raw float32 features (B, D) -> logits (B, C)."""
        check_is_fitted(self)
        return copy.deepcopy(self.network_).eval()

    def as_module(self) -> nn.Module:
        logits = self.as_logits_module()
        return nn.Sequential(OrderedDict(logits=logits, softmax=nn.Softmax(dim=1))).eval()

    def to_tensors(self) -> dict[str, Tensor]:
        check_is_fitted(self)
        return {key: value.detach().clone() for key, value in self.network_.state_dict().items()}

    def _load_tensors(self, tensors: dict[str, Tensor], config: dict) -> None:
        network = self._build_network(self.n_features_in_, len(self.classes_))
        try:
            network.load_state_dict(tensors)
        except RuntimeError as error:
            raise HeadError(f"saved tensors do not match the {self.name} head: {error}") from error
        self.network_ = network.eval()

    def _standardized_network(self, X: np.ndarray, n_classes: int) -> nn.Sequential:
        network = self._build_network(X.shape[1], n_classes)
        mean, scale = standardization(X)
        with torch.no_grad():
            network.standardize.mean.copy_(mean)
            network.standardize.scale.copy_(scale)
        return network


def parameter_grid(value: float | Sequence[float], name: str, *, allow_zero: bool = False) -> list[float]:
    """A number or a list of numbers as a non-empty list of positive floats."""
    if isinstance(value, (str, bytes, dict)) or not (np.isscalar(value) or isinstance(value, (list, tuple))):
        raise HeadError(f"{name} must be a positive number or a list of them, got {value!r}")
    values = [value] if np.isscalar(value) else list(value)
    allowed = [isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
               and math.isfinite(v) and (v > 0 or allow_zero and v == 0) for v in values]
    if not values or not all(allowed):
        raise HeadError(f"{name} must be a positive number or a list of them, got {value!r}")
    return [float(v) for v in values]


def _standardized(network: nn.Sequential, X: np.ndarray, device: torch.device) -> np.ndarray | Tensor:
    """(X - mean) / scale: a float32 NumPy array on the CPU (4x faster than torch's
    elementwise ops there, measured), a tensor on `device` elsewhere."""
    if device.type == "cpu":
        mean, scale = network.standardize.mean.numpy(), network.standardize.scale.numpy()
        out = np.subtract(X, mean, dtype=np.float32)
        out /= scale
        return out
    return network.standardize.to(device)(torch.from_numpy(X).to(device))


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
    on all rows, to `tol`, as with a single C.

    `sweep_tol` is the gradient tolerance of the selection path (default None: 10 x
    `tol`). Selection only ranks Cs by validation accuracy, which settles well before the
    gradient reaches `tol`: on 50,000 x 2048 features it cut the path's evaluations 3x
    (50 to 16 at 100 classes) and chose the same C; the chosen C's final solve still
    runs to `tol`.

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

    streams = True

    def fit_streamed(self, data: StreamedData) -> LogisticHead:
        from .streaming import fit_streaming_logistic

        self.check_params()
        return fit_streaming_logistic(self, data)

    def _Cs(self) -> list[float]:
        if self.C is None:
            return parameter_grid(DEFAULT_CS if self.Cs is None else self.Cs, "Cs")
        if not np.isscalar(self.C) or isinstance(self.C, (str, bool)):
            raise HeadError(f"C must be one number (use Cs for a grid), got {self.C!r}")
        return parameter_grid(self.C, "C")

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
               max_iter: int, tol: float, **options) -> tuple[Tensor, Tensor]:
        """The path over `Cs` on standardised features (NumPy float32 on the CPU, else a tensor)."""
        if device.type == "cpu":
            return fit_logistic_path_cpu(features, y, n_classes, Cs, max_iter=max_iter, tol=tol, **options)
        return fit_logistic_path(features, torch.from_numpy(y).to(device), n_classes, Cs, max_iter=max_iter,
                                 tol=tol, **options)

    def _sweep(self, features, y, val_features, y_val, n_classes, Cs, device,
               penalty_rows: int) -> tuple[int, Tensor, Tensor]:
        """Fit the path with validation watching it; return the best index and the path."""
        val_labels = y_val if isinstance(val_features, np.ndarray) else torch.from_numpy(y_val).to(device)
        scores: dict[int, tuple[float, float]] = {}

        def stop(index: int, weight: Tensor, bias: Tensor) -> bool:
            scores[index] = validate_linear(val_features, val_labels, weight[None], bias[None])[0]
            best_so_far = max(scores, key=lambda i: (scores[i][0], -scores[i][1]))
            since_best = sum(1 for i in scores if Cs[i] > Cs[best_so_far])
            return self.patience is not None and since_best >= self.patience

        sweep_tol = self.SWEEP_TOL_FACTOR * self.tol if self.sweep_tol is None else self.sweep_tol
        weights, biases = self._solve(features, y, n_classes, Cs, device, self.sweep_max_iter, sweep_tol, stop=stop,
                                      penalty_rows=penalty_rows)
        self.sweep_ = [{"C": C, "val_top1": scores[i][0] if i in scores else None,
                        "val_log_loss": scores[i][1] if i in scores else None,
                        "fitted": i in scores} for i, C in enumerate(Cs)]
        best = max(scores, key=lambda i: (scores[i][0], -scores[i][1]))
        logger.info("logistic: chose C=%.3g (val top-1 %.4f); %d of %d Cs fitted on %d rows",
                    Cs[best], scores[best][0], len(scores), len(Cs), len(y))
        return best, weights, biases

    def _fit(self, X, y, X_val, y_val, n_classes: int) -> None:
        Cs = self._Cs()
        if len(Cs) > 1 and X_val is None:
            raise HeadError("logistic sweep needs validation data (or pass a single C)")
        device = resolve_device(self.device)
        network = self._standardized_network(X, n_classes)
        features = _standardized(network, X, device)  # once: the sweep and the polish share it
        start, self.sweep_, self.sweep_rows_ = None, [], None
        best = 0
        if len(Cs) > 1:
            rows = self._selection_rows(len(y), n_classes)
            subset = (slice(None) if rows == len(y)
                      else np.sort(np.random.default_rng(0).permutation(len(y))[:rows]))
            sample = features[subset] if isinstance(features, np.ndarray) or rows == len(y) else \
                features[torch.from_numpy(subset).to(device)]
            best, weights, biases = self._sweep(sample, y[subset], _standardized(network, X_val, device),
                                                y_val, n_classes, Cs, device, penalty_rows=len(y))
            start, self.sweep_rows_ = (weights[best], biases[best]), rows
        chosen = Cs[best]
        self.best_params_ = {"C": chosen}
        if self.refit and X_val is not None:
            X, y, start = np.concatenate([X, X_val]), np.concatenate([y, y_val]), None
            network = self._standardized_network(X, n_classes)
            features = _standardized(network, X, device)
        # Polish the chosen C to convergence on every row, warm-started from its sweep solution.
        weights, biases = self._solve(features, y, n_classes, [chosen], device, self.max_iter, self.tol, start=start)
        with torch.no_grad():
            network.classifier.weight.copy_(weights[0])
            network.classifier.bias.copy_(biases[0])
        self.network_ = network.cpu().eval()
