"""Image sources: folders, CSV, named dataset layouts, Python objects, and image decoding."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"open_source": "sources", "Source": "sources", "Sample": "sources"})
