"""Backbones: registry, feature description, weights, preprocessing, forward-pass optimisation."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"get_backbone": "registry", "Preprocessing": "registry", "resolve_weights": "weights"})
