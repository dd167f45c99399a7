"""featurecache: run a frozen backbone over an image dataset once, fit many heads on the cache.

The public names below load on first use (PEP 562 module `__getattr__`), so that
`import featurecache` and the command line's `--help`, `ls`, `info` and `heads` do not
pay for torch, torchvision and scikit-learn (several seconds) before doing anything.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from .errors import FeatureCacheError  # noqa: E402  (light: no third-party imports)

# public name -> the submodule that defines it
_LAZY = {
    "ExtractResult": "extract.stage", "ExtractSpec": "extract.stage", "extract": "extract.stage",
    "FitSpec": "fit.stage", "fit_head": "fit.stage", "make_ensemble": "fit.stage",
    "leaderboard": "fit.headstore", "load_head": "fit.headstore",
    "load_predictor": "serve.predict", "predict": "serve.predict", "export_features": "serve.export_features",
    "Cache": "cache.store", "open_cache": "cache.store",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily
    from .extract.stage import ExtractResult, ExtractSpec, extract
    from .fit.stage import FitSpec, fit_head, make_ensemble
    from .serve.export_features import export_features
    from .fit.headstore import leaderboard, load_head
    from .serve.predict import load_predictor, predict
    from .cache.store import Cache, open_cache


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    # Importing the package `extract` set the attribute to the package
    # itself; the public name is the function, as before.
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps `featurecache.extract` the function, as it always was.

    Python sets a package attribute to a subpackage when the subpackage is first imported;
    eagerly, the functions imported after it replaced it. Loaded lazily, the subpackage
    may come first (`from featurecache.extract import ExtractSpec`), so that one setattr
    is ignored here: the submodule stays reachable through sys.modules and importlib.
    """

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and name in _SHADOWED:
            return
        super().__setattr__(name, value)


_SHADOWED = {"extract", "finetune"}  # stage packages named like the function they export
sys.modules[__name__].__class__ = _Package


__all__ = [
    "Cache", "ExtractResult", "ExtractSpec", "FeatureCacheError", "FitSpec", "__version__", "export_features", "extract",
    "fit_head", "leaderboard", "load_head", "load_predictor", "make_ensemble", "open_cache", "predict",
]
