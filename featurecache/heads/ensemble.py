"""The soft-voting ensemble: a weighted average of fitted heads' probabilities."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted
from torch import Tensor, nn

from ..errors import HeadError, MismatchError
from .base import Head, as_features, jsonable

logger = logging.getLogger("featurecache")


def normalized_weights(weights: Sequence[float] | None, count: int) -> np.ndarray:
    """Soft-voting weights (equal when None) scaled to sum to one; refused unless `count` non-negative numbers."""
    numbers = weights is None or isinstance(weights, (list, tuple, np.ndarray)) and all(
        isinstance(w, (int, float, np.integer, np.floating)) and not isinstance(w, (bool, np.bool_)) for w in weights)
    values = np.empty(0) if not numbers else np.ones(count) if weights is None else np.asarray(weights, np.float64)
    if values.shape != (count,) or not np.isfinite(values).all() or (values < 0).any() or not values.any():
        raise HeadError(f"ensemble weights must be {count} non-negative numbers, not all zero; got {weights!r}")
    values = values / values.max()  # relative weights: 1e308 twice would sum to inf
    return values / values.sum()


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
        if self.members is not None and len(self.members) != len(self.heads):
            raise HeadError(f"{len(self.members)} member names for {len(self.heads)} heads")
        return normalized_weights(self.weights, len(self.heads))

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
