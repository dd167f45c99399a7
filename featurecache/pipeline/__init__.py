"""TOML pipelines: schema, runner, the digits demo, and backbone comparisons."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"load_pipeline": "runner", "run_pipeline": "runner", "demo_pipeline": "demo",
                                               "compare_backbones": "compare", "Comparison": "compare"})
