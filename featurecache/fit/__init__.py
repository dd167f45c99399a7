"""Stage 2, fit-head: fit heads on cached features (in memory or streamed), store and rank them."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"FitSpec": "stage", "fit_head": "stage", "make_ensemble": "stage", "load_head": "headstore", "leaderboard": "headstore"})
