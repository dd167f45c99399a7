"""featurecache: run a frozen backbone over an image dataset once, fit many heads on the cache."""

__version__ = "0.1.0"

from .errors import FeatureCacheError  # noqa: E402
from .extract import ExtractResult, ExtractSpec, extract  # noqa: E402
from .store import Cache, open_cache  # noqa: E402

__all__ = ["Cache", "ExtractResult", "ExtractSpec", "FeatureCacheError", "extract", "open_cache", "__version__"]
