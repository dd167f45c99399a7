"""Using fitted heads: predict on images or cached splits, export models and features."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"load_predictor": "predict", "predict_split": "predict", "export_model": "export"})
