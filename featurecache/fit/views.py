"""Heads on cached augmented views (`fit-head --views K`): the train rows only, ever.

- mlp: per epoch, one of the K + 1 versions of each training image (the plain centre
  view counts as one of them), drawn by the head's seed (`MLPHead.fit(views=...)`).
- logistic (and sklearn heads): the mean of the K + 1 versions of each image
  (`view_mode="mean"`, the default), or the plain rows and all K views stacked as K + 1
  rows per image (`view_mode="stack"`). Measured (BENCHMARKS.md, random weights): on
  digits the mean beat the stack at every K (by 1.1-1.4 points); on hymenoptera the two
  were within each other's seed spread.
- knn: the plain features; the record says the views were not used.

Validation and test rows are always the plain view: views are looked up for the
training rows by their position in the train split, after any validation fraction was
carved out of it, so a row that selects C or epochs never has a view in training, and
selection reads plain val features.
"""

from __future__ import annotations

import numpy as np

from ..cache.store import Cache
from ..cache.views import available_views, choose_view_set, load_views
from ..errors import CorruptCacheError, HeadError

VIEW_MODES = ("stack", "mean")


def check_views_spec(views: object, view_mode: str | None) -> None:
    if views is not None and views != "all" and not (isinstance(views, int) and not isinstance(views, bool)
                                                     and 1 <= views <= 1024):
        raise HeadError(f"--views must be a number of views from 1 to 1024 or 'all', got {views!r}")
    if view_mode is not None and view_mode not in VIEW_MODES:
        raise HeadError(f"unknown view mode {view_mode!r}; use stack or mean")


def train_views(cache: Cache, spec, train_rows: np.ndarray) -> tuple[np.ndarray | None, dict | None]:
    """The views of the training rows `train_rows` (N x K x D), and what the record says of them."""
    if spec.views is None:
        return None, None
    if spec.head == "knn":
        return None, {"views": 0, "note": "knn keeps the plain features; the views were not used"}
    directory, manifest = choose_view_set(cache.path, cache.key, spec.view_set)
    count = available_views(manifest) if spec.views == "all" else spec.views
    if count == 0:
        raise HeadError(f"the view set {manifest['view_key'][:16]} holds no complete view yet; run featurecache "
                        f"extract with --views K --augment {manifest['augment']}")
    bank = load_views(cache, directory, manifest, spec.tap, count)
    bank = bank.reshape(len(bank), count, -1)[train_rows]
    if not np.isfinite(bank).all():
        raise CorruptCacheError(f"the views of {cache.path.name} hold NaN or inf; run featurecache verify")
    mode = "sample" if spec.head == "mlp" else (spec.view_mode or "mean")
    return bank, {"views": count, "view_set": manifest["view_key"][:16], "augment": manifest["augment"],
                  "view_seed": manifest["seed"], "mode": mode}


def fit_with_views(head, X: np.ndarray, y: np.ndarray, X_val, y_val, n_classes: int, bank: np.ndarray | None,
                   info: dict | None) -> None:
    """Fit `head` on the training rows and their views as `info["mode"]` says; validation plain."""
    if bank is None:
        head.fit(X, y, X_val, y_val, n_classes=n_classes)
    elif info["mode"] == "sample":
        head.fit(X, y, X_val, y_val, n_classes=n_classes, views=bank)
    elif info["mode"] == "mean":
        head.fit((X + bank.sum(axis=1, dtype=np.float32)) / (bank.shape[1] + 1), y, X_val, y_val,
                 n_classes=n_classes)
    else:
        stacked = np.concatenate([X, bank.transpose(1, 0, 2).reshape(-1, X.shape[1])])
        head.fit(stacked, np.tile(y, bank.shape[1] + 1), X_val, y_val, n_classes=n_classes)
