"""Stage 3, finetune: unfreeze the last blocks and train from the cache's checkpoint (LP-FT)."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"FinetuneSpec": "stage", "finetune": "stage", "load_finetuned_predictor": "stage"})
