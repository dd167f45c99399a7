"""featurecache: run a frozen backbone over an image dataset once, fit many heads on the cache.

The public API covers every stage for notebook users: `extract`, `open_cache`,
`fit_head`, `make_ensemble`, `finetune`, `predict` / `load_predictor`, `export`,
`export_features`, `verify` / `repair`, `build_report`, `run_pipeline`, `compare_backbones`.

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

_LAZY = {  # public name -> "submodule" or "submodule:attribute" that defines it
    # extract
    "ExtractResult": "extract.stage", "ExtractSpec": "extract.stage", "extract": "extract.stage",
    # the cache
    "Cache": "cache.store", "open_cache": "cache.store",
    # fit-head
    "FitSpec": "fit.stage", "fit_head": "fit.stage", "make_ensemble": "fit.stage",
    "leaderboard": "fit.headstore", "load_head": "fit.headstore", "make_head": "heads.registry",
    # predict and export
    "load_predictor": "serve.predict", "predict": "serve.predict", "predict_split": "serve.predict",
    "export": "serve.export:export_model", "export_features": "serve.export_features",
    # finetune
    "FinetuneSpec": "finetune.stage", "finetune": "finetune.stage",
    "load_finetuned_predictor": "finetune.stage",
    # verify and repair
    "verify": "maintain.verify:verify_entry", "repair": "maintain.verify:repair_entry",
    # report and pipelines
    "ReportSpec": "report.page", "build_report": "report.page",
    "load_pipeline": "pipeline.runner", "run_pipeline": "pipeline.runner",
    # compare backbones
    "Comparison": "pipeline.compare", "compare_backbones": "pipeline.compare",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily
    from .cache.store import Cache, open_cache
    from .extract.stage import ExtractResult, ExtractSpec, extract
    from .finetune.stage import FinetuneSpec, finetune, load_finetuned_predictor
    from .fit.headstore import leaderboard, load_head
    from .fit.stage import FitSpec, fit_head, make_ensemble
    from .heads.registry import make_head
    from .maintain.verify import repair_entry as repair, verify_entry as verify
    from .pipeline.compare import Comparison, compare_backbones
    from .pipeline.runner import load_pipeline, run_pipeline
    from .report.page import ReportSpec, build_report
    from .serve.export import export_model as export
    from .serve.export_features import export_features
    from .serve.predict import load_predictor, predict, predict_split


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attribute = module.partition(":")
    value = getattr(importlib.import_module(f".{module}", __name__), attribute or name)
    # Importing the package `extract` set the attribute to the package
    # itself; the public name is the function, as before.
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps `featurecache.extract` and `featurecache.finetune` the functions.

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


__all__ = sorted([*_LAZY, "FeatureCacheError", "__version__"])
