"""TOML pipelines: schema, runner, and the digits demo."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"load_pipeline": "runner", "run_pipeline": "runner", "demo_pipeline": "demo"})
