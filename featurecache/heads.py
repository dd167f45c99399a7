"""Classifier heads over cached features, and the registry that names them.

Every head follows the scikit-learn estimator contract (`featurecache.linear.Head`),
saves as tensors plus a JSON config (never pickle) and, where it can, exports a torch
module from raw features to probabilities. Examples: `make_head("logistic")`,
`make_head("mlp", hidden_sizes=(256,))`, `make_head("knn", k=10)`,
`make_head("sklearn:svm.LinearSVC", C=0.1)`, `make_head("ensemble", heads=[a, b])`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import ClassifierMixin
from sklearn.utils.validation import check_is_fitted
from torch import Tensor, nn

from .errors import HeadError, MismatchError
from .linear import (BLOCK_ELEMENTS, Head, LogisticHead, MLPHead, Standardize, as_features,
                     jsonable, resolve_device, standardization)

__all__ = [
    "EnsembleHead", "Head", "KNNHead", "LogisticHead", "MLPHead", "SklearnHead",
    "available_heads", "head_from_saved", "make_head", "register_head", "unregister_head",
]

logger = logging.getLogger("featurecache")

SKLEARN_PREFIX = "sklearn:"
STREAMED_BLOCK_ELEMENTS = 2**22  # a streamed k-NN head's (queries, shard) products: 16 MiB
_HEADS: dict[str, type[Head]] = {}


def register_head(name: str, cls: type[Head]) -> None:
    """Make `cls` available as `make_head(name)`; refuses a name already taken."""
    if name in _HEADS:
        raise ValueError(f"head {name!r} is already registered")
    if name.startswith(SKLEARN_PREFIX):
        raise ValueError(f"head names starting with {SKLEARN_PREFIX!r} are reserved")
    _HEADS[name] = cls


def unregister_head(name: str) -> None:
    if _HEADS.pop(name, None) is None:
        raise HeadError(f"head {name!r} is not registered")


def available_heads() -> list[str]:
    return sorted(_HEADS)


def _sklearn_class(path: str) -> type:
    """The sklearn classifier named "<module>.<Estimator>", e.g. "svm.LinearSVC"."""
    module_name, _, class_name = path.rpartition(".")
    if not module_name or not class_name:
        raise HeadError(f"expected sklearn:<module>.<Estimator> (e.g. sklearn:svm.LinearSVC), "
                        f"got sklearn:{path}")
    try:
        module = importlib.import_module(f"sklearn.{module_name}")
    except ImportError as error:
        raise HeadError(f"sklearn has no module {module_name!r} (in sklearn:{path})") from error
    cls = getattr(module, class_name, None)
    if not inspect.isclass(cls):
        raise HeadError(f"sklearn.{module_name} has no estimator {class_name!r}")
    if not issubclass(cls, ClassifierMixin):
        raise HeadError(f"sklearn.{module_name}.{class_name} is not a classifier")
    return cls


def make_head(name: str, **params: Any) -> Head:
    """An unfitted head: a registered name or "sklearn:<module>.<Estimator>"."""
    if name.startswith(SKLEARN_PREFIX):
        n_classes = params.pop("n_classes", None)
        head: Head = SklearnHead(estimator=name[len(SKLEARN_PREFIX):], params=params,
                                 n_classes=n_classes)
    elif name in _HEADS:
        accepted = inspect.signature(_HEADS[name].__init__).parameters
        unknown = sorted(set(params) - set(accepted))
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            valid = ", ".join(sorted(set(accepted) - {"self"}))
            raise HeadError(f"head {name!r} has no parameter {', '.join(unknown)}; valid: {valid}")
        head = _HEADS[name](**params)
    else:
        choices = ", ".join(available_heads() + [f"{SKLEARN_PREFIX}<module>.<Estimator>"])
        raise HeadError(f"unknown head {name!r}; available: {choices}")
    head._check_params()
    return head


def head_from_saved(config: dict, tensors: dict[str, Tensor],
                    members: Sequence[Head] | None = None) -> Head:
    """Rebuild a fitted head from its `to_config()` and `to_tensors()`.

    An ensemble also needs its loaded member heads, in `config["params"]["members"]` order.
    """
    name = config.get("head", "")
    if name == EnsembleHead.name:
        if members is None:
            raise HeadError("rebuilding an ensemble needs its member heads (members=)")
        params = config["params"]
        return EnsembleHead.from_members(members, params["weights"], params["members"])
    if name.startswith(SKLEARN_PREFIX):
        return SklearnHead.from_saved(config, tensors)
    if name not in _HEADS:
        choices = ", ".join(available_heads())
        raise HeadError(f"saved head {name!r} is unknown; available: {choices}")
    return _HEADS[name].from_saved(config, tensors)


# --------------------------------------------------------------------------------- k-NN


def knn_vote(similarities: Tensor, neighbor_labels: Tensor, n_classes: int,
             temperature: float, uniform: bool) -> Tensor:
    """Class probabilities from the (B, k) similarities and labels of the nearest neighbours,
    mixed with 1e-4 of the uniform distribution so that log-loss stays finite."""
    if uniform:
        weights = torch.ones_like(similarities)
    else:  # exp(s / T) as in DINOv2's k-NN; subtracting the top similarity avoids overflow
        weights = torch.exp((similarities - similarities[:, :1]) / temperature)
    votes = torch.zeros(similarities.shape[0], n_classes, device=similarities.device)
    votes.scatter_add_(1, neighbor_labels, weights)
    return votes / votes.sum(dim=1, keepdim=True) * (1.0 - 1e-4) + 1e-4 / n_classes


def nearest_neighbours(queries: Tensor, bank_chunks: Iterable[tuple[Tensor, Tensor]], k: int,
                       block_elements: int = BLOCK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """(similarities, labels) of the k bank rows most similar to each query, best first.

    Queries and bank rows are L2-normalised. The bank comes in chunks (the whole bank, or
    one shard at a time) and a running top-k is merged chunk by chunk, so memory is one
    chunk plus queries x k; blocks of queries keep each (queries, chunk) product under
    `block_elements` values."""
    similarities = queries.new_empty((len(queries), 0))
    labels = torch.empty((len(queries), 0), dtype=torch.long, device=queries.device)
    for bank, bank_labels in bank_chunks:
        if len(bank) == 0:
            continue
        rows, found, found_labels = max(1, block_elements // len(bank)), [], []
        for start in range(0, len(queries), rows):
            values, indices = (queries[start : start + rows] @ bank.T).topk(min(k, len(bank)), dim=1)
            found.append(values)
            found_labels.append(bank_labels[indices])
        chunk, chunk_labels = torch.cat(found), torch.cat(found_labels)
        if similarities.shape[1]:
            chunk, chunk_labels = torch.cat([similarities, chunk], 1), torch.cat([labels, chunk_labels], 1)
            chunk, order = chunk.topk(min(k, chunk.shape[1]), dim=1)
            chunk_labels = chunk_labels.gather(1, order)
        similarities, labels = chunk, chunk_labels
    return similarities, labels


class KNNModule(nn.Module):
    """Cosine k-NN classifier with its L2-normalised training bank as buffers."""

    def __init__(self, bank: Tensor, bank_labels: Tensor, k: int, n_classes: int,
                 temperature: float, uniform: bool) -> None:
        super().__init__()
        self.register_buffer("bank", bank)
        self.register_buffer("bank_labels", bank_labels)
        self.k = k
        self.n_classes = n_classes
        self.temperature = temperature
        self.uniform = uniform

    def forward(self, x: Tensor) -> Tensor:
        similarities, indices = (F.normalize(x, dim=1) @ self.bank.T).topk(self.k, dim=1)
        return knn_vote(similarities, self.bank_labels[indices], self.n_classes,
                        self.temperature, self.uniform)


class StreamedKNNModule(nn.Module):
    """Features -> probabilities of a k-NN head whose bank is read from disk at each call.

    Usable for prediction; TorchScript (script or trace, hence export) is refused with
    the head's reason, since the bank is not in the module."""

    def __init__(self, head: KNNHead) -> None:
        super().__init__()
        self.head = head

    def __prepare_scriptable__(self) -> nn.Module:
        raise HeadError(self.head.export_refusal())

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():
            raise HeadError(self.head.export_refusal())
        return torch.from_numpy(self.head.predict_proba(x.detach().cpu().numpy()))


class KNNHead(Head):
    """k nearest neighbours by cosine similarity, votes weighted by exp(similarity /
    temperature) or uniform; `k` is an int or a grid chosen on validation data.

    The bank is the normalised training features, in memory (`bank_`), or, for a head
    fitted out of core, read shard by shard from its cache (`bank_source_` names the
    split and tap; `bank_reader_` yields raw (features, labels) chunks and is attached
    by `featurecache.load_head`)."""

    name = "knn"
    _saved_attributes = ("best_params_", "sweep_", "bank_source_")

    def __init__(self, *, k: int | Sequence[int] = (1, 3, 5, 10, 20, 50),
                 weighting: str = "similarity", temperature: float = 0.07,
                 device: str = "auto", n_classes: int | None = None) -> None:
        self.k = k
        self.weighting = weighting
        self.temperature = temperature
        self.device = device
        self.n_classes = n_classes

    def _ks(self) -> list[int]:
        ks = [self.k] if np.isscalar(self.k) else list(self.k)
        if not ks or not all(isinstance(k, (int, np.integer)) and k > 0 for k in ks):
            raise HeadError(f"k must be a positive integer or a list of them, got {self.k!r}")
        return [int(k) for k in ks]

    def _check_params(self) -> None:
        self._ks()
        if self.weighting not in ("similarity", "uniform"):
            raise HeadError(f"weighting must be 'similarity' or 'uniform', got {self.weighting!r}")
        if not self.temperature > 0:
            raise HeadError(f"temperature must be positive, got {self.temperature!r}")
        resolve_device(self.device)

    def _module(self, k: int, n_classes: int, device: torch.device | str = "cpu") -> KNNModule:
        return KNNModule(self.bank_.to(device), self.bank_labels_.to(device), k, n_classes,
                         float(self.temperature), self.weighting == "uniform")

    def _fit(self, X, y, X_val, y_val, n_classes: int) -> None:
        ks = sorted({min(k, len(X)) for k in self._ks()})
        if len(ks) > 1 and X_val is None:
            raise HeadError("knn needs validation data to choose k from a grid (or pass one k)")
        self.bank_ = F.normalize(torch.from_numpy(X), dim=1)
        self.bank_labels_ = torch.from_numpy(y)
        self.bank_source_ = None
        self.choose_k(ks, [] if X_val is None else [(X_val, y_val)], n_classes)

    def choose_k(self, ks: list[int], validation: Iterable[tuple[np.ndarray, np.ndarray]],
                 n_classes: int) -> None:
        """Score every k in `ks` (sorted, at most the bank size) on validation blocks of
        (features, labels), one neighbour search per block; keep the best k."""
        device = resolve_device(self.device)
        correct, loss, n = np.zeros(len(ks)), np.zeros(len(ks)), 0
        for X_val, y_val in validation:
            similarities, neighbour_labels = self._neighbours(X_val, ks[-1], device)
            labels = torch.from_numpy(y_val).to(device)
            for index, k in enumerate(ks):  # the top-k of every k are prefixes of the top-max(k)
                probabilities = knn_vote(similarities[:, :k], neighbour_labels[:, :k], n_classes,
                                         float(self.temperature), self.weighting == "uniform")
                correct[index] += (probabilities.argmax(dim=1) == labels).sum().item()
                loss[index] -= probabilities.gather(1, labels[:, None]).log().sum().item()
            n += len(y_val)
        self.sweep_ = [{"k": k, "val_top1": c / n, "val_log_loss": total / n}
                       for k, c, total in zip(ks, correct, loss)] if n else []
        best = max(self.sweep_, key=lambda entry: (entry["val_top1"], -entry["val_log_loss"]),
                   default={"k": ks[0]})
        self.best_params_ = {"k": best["k"]}
        logger.info("knn: chose k=%d", best["k"])

    def _bank_chunks(self, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        if not getattr(self, "bank_source_", None):
            yield self.bank_.to(device), self.bank_labels_.to(device)
            return
        reader = getattr(self, "bank_reader_", None)
        if reader is None:
            raise HeadError("this knn head searches its cache's features on disk; load it with "
                            "featurecache.load_head(cache, name), which attaches them")
        for features, labels in reader():  # normalised in place, as F.normalize would: one copy of a shard
            features = features.to(device)
            yield features.div_(features.norm(dim=1, keepdim=True).clamp_min(1e-12)), labels.to(device)

    def _neighbours(self, X: np.ndarray, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
        queries = F.normalize(torch.from_numpy(as_features(X)).to(device), dim=1)
        streamed = getattr(self, "bank_source_", None)  # out of core: smaller products too
        return nearest_neighbours(queries, self._bank_chunks(device), k,
                                  STREAMED_BLOCK_ELEMENTS if streamed else BLOCK_ELEMENTS)

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        device = resolve_device(self.device)
        with torch.no_grad():
            similarities, labels = self._neighbours(X, self.best_params_["k"], device)
            return knn_vote(similarities, labels, len(self.classes_), float(self.temperature),
                            self.weighting == "uniform").cpu().numpy()

    def export_refusal(self) -> str:
        """Why a streamed head has no self-contained module, and what to do instead."""
        source = self.bank_source_
        return (f"this knn head searches the cache's {source['rows']:,} {source['split']} rows on disk (its bank "
                f"exceeded the memory budget when it was fitted), so it cannot be exported; export a logistic or "
                f"mlp head, or fit knn again with --max-memory {-(-source['bytes'] // 2**20)}M or more")

    def as_module(self) -> nn.Module:
        check_is_fitted(self)
        if getattr(self, "bank_source_", None):
            return StreamedKNNModule(self).eval()
        return self._module(self.best_params_["k"], len(self.classes_)).eval()

    def to_tensors(self) -> dict[str, Tensor]:
        check_is_fitted(self)
        if getattr(self, "bank_source_", None):
            return {}  # the bank stays in the cache's shards
        return {"bank": self.bank_.contiguous(), "bank_labels": self.bank_labels_.contiguous()}

    def _load_tensors(self, tensors: dict[str, Tensor], config: dict) -> None:
        if self.bank_source_:
            return
        self.bank_ = tensors["bank"].float()
        self.bank_labels_ = tensors["bank_labels"].long()
        if self.bank_.shape[1] != self.n_features_in_:
            raise MismatchError(f"saved knn bank has {self.bank_.shape[1]} features, "
                                f"the config {self.n_features_in_}")


# ------------------------------------------------------------------------------ sklearn


def _softmax(scores: np.ndarray) -> np.ndarray:
    exponentials = np.exp(scores - scores.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


class LinearSoftmax(nn.Module):
    """softmax(W standardise(x) + b) over the classes an sklearn linear model was fitted
    on; classes absent from its training data get probability 0."""

    def __init__(self, mean: Tensor, scale: Tensor, weight: Tensor, bias: Tensor,
                 columns: Tensor, n_classes: int) -> None:
        super().__init__()
        self.standardize = Standardize(mean, scale)
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
        self.register_buffer("columns", columns)
        self.n_classes = n_classes
        self.binary = weight.shape[0] == 1  # sklearn keeps one score row for two classes

    def forward(self, x: Tensor) -> Tensor:
        logits = self.linear(self.standardize(x))
        if self.binary:
            logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
        full = torch.full((x.shape[0], self.n_classes), float("-inf"), device=x.device)
        return torch.softmax(full.index_copy(1, self.columns, logits), dim=1)


def _estimator_state(estimator: Any, label: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The fitted state of an sklearn estimator as (JSON values, numeric arrays).

    Takes every attribute that is not a constructor parameter, private ones included,
    since some estimators predict from them; refuses any that is an object."""
    params = estimator.get_params(deep=False)
    values, arrays = {}, {}
    for key, value in vars(estimator).items():
        if key in params:
            continue
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            arrays[key] = value
            continue
        try:
            values[key] = jsonable(value)
        except HeadError:
            raise HeadError(
                f"{label} cannot be saved safely: its attribute {key!r} holds a "
                f"{type(value).__name__}, not arrays or plain values, and featurecache never "
                "pickles. Use a linear estimator (sklearn:linear_model.LogisticRegression, "
                "sklearn:svm.LinearSVC) or the logistic head."
            ) from None
    return values, arrays


class SklearnHead(Head):
    """An sklearn classifier (`estimator` "<module>.<Estimator>", built with `params`)
    fitted on standardised features. Probabilities come from its `predict_proba`, or
    else the softmax of its `decision_function`."""

    _saved_attributes = ("exportable_",)

    def __init__(self, *, estimator: str = "linear_model.LogisticRegression",
                 params: dict | None = None, n_classes: int | None = None) -> None:
        self.estimator = estimator
        self.params = params
        self.n_classes = n_classes

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{SKLEARN_PREFIX}{self.estimator}"

    def _new_estimator(self) -> Any:
        try:
            return _sklearn_class(self.estimator)(**(self.params or {}))
        except TypeError as error:
            raise HeadError(f"bad parameters for {self.name}: {error}") from error

    def _check_params(self) -> None:
        self._new_estimator()

    def _probabilities(self, standardized: np.ndarray, n_classes: int) -> np.ndarray:
        estimator = self.estimator_
        if hasattr(estimator, "predict_proba"):
            seen = estimator.predict_proba(standardized)
        else:
            scores = estimator.decision_function(standardized)
            if scores.ndim == 1:
                scores = np.stack([np.zeros_like(scores), scores], axis=1)
            seen = _softmax(scores)
        probabilities = np.zeros((len(standardized), n_classes))
        probabilities[:, estimator.classes_.astype(np.int64)] = seen
        return probabilities

    def _is_linear_softmax(self, standardized: np.ndarray) -> bool:
        """Whether probabilities are softmax(coef_ x + intercept_): not so for one-vs-rest,
        pairwise or calibrated models, whatever their `coef_`."""
        coef, intercept = (getattr(self.estimator_, name, None) for name in ("coef_", "intercept_"))
        if not isinstance(coef, np.ndarray) or coef.ndim != 2 or intercept is None:
            return False
        logits = standardized @ coef.T + intercept
        if logits.shape[1] == 1:
            logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
        seen = self.estimator_.classes_.astype(np.int64)
        if logits.shape[1] != len(seen):
            return False
        expected = self._probabilities(standardized, int(seen.max()) + 1)[:, seen]
        return bool(np.allclose(_softmax(logits), expected, atol=1e-5))

    def _fit(self, X, y, X_val, y_val, n_classes: int) -> None:
        self.mean_, self.scale_ = (statistic.numpy() for statistic in standardization(X))
        standardized = (X - self.mean_) / self.scale_
        self.estimator_ = self._new_estimator()
        self.estimator_.fit(standardized, y)
        self.exportable_ = self._is_linear_softmax(standardized[:256])

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self._probabilities((X - self.mean_) / self.scale_, len(self.classes_))

    def to_config(self) -> dict:
        check_is_fitted(self)
        state = _estimator_state(self.estimator_, self.name)[0]
        return {**super().to_config(), "estimator_state": state}

    def to_tensors(self) -> dict[str, Tensor]:
        check_is_fitted(self)
        arrays = _estimator_state(self.estimator_, self.name)[1]
        tensors = {f"estimator.{key}": torch.from_numpy(np.ascontiguousarray(value))
                   for key, value in arrays.items()}
        return {"mean": torch.from_numpy(self.mean_), "scale": torch.from_numpy(self.scale_),
                **tensors}

    def _load_tensors(self, tensors: dict[str, Tensor], config: dict) -> None:
        self.mean_, self.scale_ = tensors["mean"].numpy().copy(), tensors["scale"].numpy().copy()
        self.estimator_ = self._new_estimator()
        for key, value in config["estimator_state"].items():
            setattr(self.estimator_, key, value)
        for key, tensor in tensors.items():
            if key.startswith("estimator."):
                setattr(self.estimator_, key.removeprefix("estimator."), tensor.numpy().copy())

    def as_module(self) -> nn.Module:
        check_is_fitted(self)
        if not self.exportable_:
            raise HeadError(
                f"{self.name} is not a softmax of a linear map, so it has no torch module; use "
                "sklearn:linear_model.LogisticRegression, sklearn:svm.LinearSVC or logistic")
        coef = np.asarray(self.estimator_.coef_, dtype=np.float32)
        intercept = np.broadcast_to(np.asarray(self.estimator_.intercept_, np.float32), len(coef))
        columns = torch.from_numpy(self.estimator_.classes_.astype(np.int64))
        return LinearSoftmax(torch.from_numpy(self.mean_), torch.from_numpy(self.scale_),
                             torch.from_numpy(coef), torch.from_numpy(intercept.copy()),
                             columns, len(self.classes_)).eval()


# ----------------------------------------------------------------------------- ensemble


class EnsembleModule(nn.Module):
    """Weighted sum of member modules' probabilities."""

    def __init__(self, members: list[nn.Module], weights: Sequence[float]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        total = torch.zeros(0)  # TorchScript wants it defined before the loop
        for index, member in enumerate(self.members):
            part = self.weights[index] * member(x)
            total = part if index == 0 else total + part
        return total


class EnsembleHead(Head):
    """Soft voting over already-fitted heads, with `weights` normalised to sum to one.

    `members` names the heads as the caller saved them; it is needed to save the ensemble.
    """

    name = "ensemble"

    def __init__(self, heads: Sequence[Head] = (), weights: Sequence[float] | None = None, *,
                 members: Sequence[str] | None = None) -> None:
        self.heads = heads
        self.weights = weights
        self.members = members

    @classmethod
    def from_members(cls, heads: Sequence[Head], weights: Sequence[float] | None = None,
                     names: Sequence[str] | None = None) -> EnsembleHead:
        """A fitted ensemble of `heads` (e.g. loaded from disk)."""
        return cls(list(heads), weights, members=names).fit()

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, Tensor]) -> Head:
        raise HeadError("rebuild an ensemble with head_from_saved(..., members=heads)")

    def _normalized_weights(self) -> np.ndarray:
        if not self.heads:
            raise HeadError("an ensemble needs at least one head")
        n = len(self.heads)
        weights = np.ones(n) if self.weights is None else np.asarray(self.weights, np.float64)
        if weights.shape != (n,) or (weights < 0).any() or weights.sum() <= 0:
            raise HeadError(f"ensemble weights must be {n} non-negative numbers, not all zero")
        if self.members is not None and len(self.members) != n:
            raise HeadError(f"{len(self.members)} member names for {n} heads")
        return weights / weights.sum()

    def _check_params(self) -> None:
        self._normalized_weights()

    def fit(self, X=None, y=None, X_val=None, y_val=None, **_: Any) -> EnsembleHead:
        """Members are fitted already: only checks that they agree, and with X if given."""
        self.weights_ = self._normalized_weights()
        for index, head in enumerate(self.heads):
            if not hasattr(head, "classes_"):
                raise HeadError(f"ensemble member {index} is not fitted")
        first = self.heads[0]
        for head in self.heads[1:]:
            if len(head.classes_) != len(first.classes_):
                raise MismatchError(f"ensemble members disagree on the number of classes: "
                                    f"{len(first.classes_)} vs {len(head.classes_)}")
            if head.n_features_in_ != first.n_features_in_:
                raise MismatchError(f"ensemble members disagree on the number of features: "
                                    f"{first.n_features_in_} vs {head.n_features_in_}")
        if X is not None:
            as_features(X, first.n_features_in_)
        self.classes_ = np.arange(len(first.classes_))
        self.n_features_in_ = first.n_features_in_
        return self

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        parts = [weight * head.predict_proba(X) for weight, head in zip(self.weights_, self.heads)]
        return sum(parts[1:], parts[0])

    def to_config(self) -> dict:
        check_is_fitted(self)
        if self.members is None:
            raise HeadError("name the ensemble's members (members=[...]) to save it")
        return {"head": self.name,
                "params": {"weights": jsonable(self.weights), "members": list(self.members)},
                "weights_": self.weights_.tolist(), "n_classes": len(self.classes_),
                "n_features": int(self.n_features_in_)}

    def to_tensors(self) -> dict[str, Tensor]:
        check_is_fitted(self)
        return {"weights": torch.from_numpy(self.weights_.copy())}

    def as_module(self) -> nn.Module:
        check_is_fitted(self)
        members = [head.as_module() for head in self.heads]
        return EnsembleModule(members, self.weights_.tolist()).eval()


register_head("logistic", LogisticHead)
register_head("mlp", MLPHead)
register_head("knn", KNNHead)
register_head("ensemble", EnsembleHead)
