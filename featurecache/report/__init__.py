"""The HTML report and its plots."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"ReportSpec": "page", "build_report": "page"})
