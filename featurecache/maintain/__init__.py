"""Verify and repair cache entries (above the stages: repair re-runs extraction)."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"verify_entry": "verify", "repair_entry": "verify"})
