"""Stage 1, extract: plan the work, run the frozen backbone, write shards in the background."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"ExtractSpec": "stage", "ExtractResult": "stage", "extract": "stage"})
