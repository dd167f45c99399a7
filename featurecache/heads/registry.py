"""The registry that names the heads: `make_head`, `head_from_saved`, `register_head`.

The `Head` base lives in `base`, the heads in `logistic`, `mlp`, `knn`, `sklearn_head`
(the scikit-learn wrapper) and `ensemble` (soft voting).

Every head follows the scikit-learn estimator contract (`featurecache.heads.base.Head`),
saves as tensors plus a JSON config (never pickle) and, where it can, exports a torch
module from raw features to probabilities. Examples: `make_head("logistic")`,
`make_head("mlp", hidden_sizes=(256,))`, `make_head("knn", k=10)`,
`make_head("sklearn:svm.LinearSVC", C=0.1)`, `make_head("ensemble", heads=[a, b])`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..errors import HeadError
from .knn import KNNHead
from .base import Head
from .logistic import LogisticHead
from .mlp import MLPHead
from .ensemble import EnsembleHead
from .sklearn_head import SKLEARN_PREFIX, SklearnHead

__all__ = [
    "EnsembleHead", "Head", "KNNHead", "LogisticHead", "MLPHead", "SklearnHead",
    "available_heads", "head_from_saved", "streaming_heads", "make_head", "register_head", "unregister_head",
]

logger = logging.getLogger("featurecache")

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


def streaming_heads() -> list[str]:
    """The registered heads that can fit on features streamed from disk (`Head.streams`)."""
    return [name for name, cls in _HEADS.items() if cls.streams]  # in registration order


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
    head.check_params()
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


# ------------------------------------------------------------------------------ sklearn


register_head("logistic", LogisticHead)
register_head("mlp", MLPHead)
register_head("knn", KNNHead)
register_head("ensemble", EnsembleHead)
