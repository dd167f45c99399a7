"""What every head shares: the `Head` base (scikit-learn estimator contract, input checks,
JSON config, the streaming capability), `NetworkHead` for heads that are torch modules,
and the `Standardize` layer that carries the training statistics inside exported
modules, so that they take raw features.
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

from ..errors import HeadError, MismatchError, UsageError
from .logistic_path import BLOCK_ELEMENTS

if TYPE_CHECKING:
    from .streaming import StreamedData

logger = logging.getLogger("featurecache")

STD_FLOOR = 1e-6


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


def as_features(X: Any, n_features: int | None = None, name: str = "features") -> np.ndarray:
    """X as a (N, D) float32 C-contiguous array, checked against `n_features` and for
    NaN or inf (a head fitted on them, or scoring them, returns NaN probabilities, and
    argmax makes those class 0 without a word)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise MismatchError(f"features must be a 2-D (N, D) array, got shape {X.shape}")
    if n_features is not None and X.shape[1] != n_features:
        raise MismatchError(f"head expects {n_features} features, got {X.shape[1]}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    check_finite(X, name)
    return X


def check_finite(X: np.ndarray, name: str = "features") -> None:
    """Raise UsageError naming the rows of float32 X (`name`) that hold NaN or inf.

    torch's min and max propagate NaN, and an inf is one of them: one pass, no (N, D)
    mask (15 ms on 30,000 x 2048, against 42 ms for np.isfinite(X).all(), measured)."""
    if X.size == 0:
        return
    if all(math.isfinite(float(value)) for value in torch.aminmax(torch.from_numpy(X))):
        return
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
    raise UsageError(f"{name} hold NaN or inf in {len(bad)} of {len(X)} rows (first: row {bad[0]}); "
                     "heads need finite features: check how they were computed")


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
    2e-6 relative of them. (X.std makes an (N, D) float64 temporary: slower still.)
    Features whose squares overflow float32 (|x| from about 1e18) take the float64 pass:
    an inf std would have divided them to 0, and the head ignored them without a word."""
    moments = _moments(X, np.float32)
    if not all(np.isfinite(value).all() for value in moments):
        moments = _moments(X, np.float64)
    mean, std = moments
    if not (np.isfinite(mean.astype(np.float32)).all() and np.isfinite(std.astype(np.float32)).all()):
        raise UsageError("features too large to standardise in float32 (a mean or std beyond 3.4e38): rescale them")
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32))


def _moments(X: np.ndarray, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and std (floored) of X's columns, from blocks computed in `dtype`."""
    n, block = len(X), 512
    shift = X[:: max(1, n // 1024)].mean(axis=0, dtype=np.float64).astype(dtype)
    total, squares = np.zeros(X.shape[1]), np.zeros(X.shape[1])
    buffer = np.empty((min(block, n), X.shape[1]), dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is what the caller checks for
        for start in range(0, n, block):
            centred = np.subtract(X[start : start + block], shift, out=buffer[: min(block, n - start)])
            total += centred.sum(axis=0)
            squares += np.einsum("ij,ij->j", centred, centred)
    offset = total / max(n, 1)
    mean = shift + offset
    std = np.maximum(np.sqrt(np.maximum(squares / max(n, 1) - offset**2, 0.0)), STD_FLOOR)
    return mean, std


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
            X_val = as_features(X_val, X.shape[1], "validation features")
            y_val = as_labels(y_val, X_val.shape[0])
        for given in (n_classes, getattr(self, "n_classes", None)):
            if given is not None and not (isinstance(given, (int, np.integer)) and not isinstance(given, bool)
                                          and given > 0):
                raise HeadError(f"n_classes must be a positive integer, got {given!r}")
        n_classes = int(n_classes or getattr(self, "n_classes", None) or int(y.max()) + 1)
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

    #: For heads that can fit on features larger than memory, read shard by shard: the name of
    #: their fitting function in `heads.streaming`; None for the others.
    streams: ClassVar[str | None] = None

    def fit_streamed(self, data: StreamedData) -> Head:
        """Fit on `data` (a cache split streamed from disk) with this head's own parameters,
        the same ones as in memory; validation is the cache's val split."""
        if not self.streams:
            raise HeadError(f"the {self.name} head cannot stream features from disk")
        from . import streaming

        self.check_params()
        return getattr(streaming, self.streams)(self, data)


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
