"""featurecache: run a frozen backbone over an image dataset once, fit many heads on the cache."""

__version__ = "0.1.0"

from .errors import FeatureCacheError  # noqa: E402
from .extract import ExtractResult, ExtractSpec, extract  # noqa: E402
from .export_features import export_features  # noqa: E402
from .fit import FitSpec, fit_head, leaderboard, make_ensemble  # noqa: E402
from .headstore import load_head  # noqa: E402
from .predict import load_predictor, predict  # noqa: E402
from .store import Cache, open_cache  # noqa: E402

__all__ = [
    "Cache", "ExtractResult", "ExtractSpec", "FeatureCacheError", "FitSpec", "__version__", "export_features", "extract",
    "fit_head", "leaderboard", "load_head", "load_predictor", "make_ensemble", "open_cache", "predict",
]
