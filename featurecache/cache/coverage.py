"""Classes an entry cannot teach: none of their train images made it into the cache.

The folder and CSV checks refuse a class listed only in val/test before extraction, but
a class whose train images were all skipped (unreadable, truncated) ends the same way
after it: no head can learn it, yet its val/test rows are scored as errors and its
column stays in every prediction. Said out loud by extract and fit-head.
"""

from __future__ import annotations

import numpy as np


def untaught_classes(classes: list[str], labels: dict[str, np.ndarray]) -> list[str]:
    """One warning (or none) given each labelled split's labels; `train` must be among them."""
    counts = {split: np.bincount(y[y >= 0], minlength=len(classes)) for split, y in labels.items()}
    if "train" not in counts:
        return []
    missing = np.flatnonzero(counts["train"] == 0)
    if not missing.size:
        return []
    names = ", ".join(repr(classes[i]) for i in missing[:5]) + (f" and {missing.size - 5} more" if missing.size > 5 else "")
    scored = [f"{int(c[missing].sum())} {split}" for split, c in counts.items() if split != "train" and c[missing].sum()]
    consequence = (f"no head can learn them, yet {' and '.join(scored)} row(s) of theirs are scored as errors"
                   if scored else "no head can learn them")
    return [f"{missing.size} class(es) have no train row ({names}): {consequence}; check the skipped files "
            "(featurecache info) and the labels"]


def untaught_classes_of(cache) -> list[str]:
    """`untaught_classes` for a cache entry (reads each labelled split's labels column)."""
    return untaught_classes(cache.classes, {split: cache.labels(split) for split in cache.labeled_splits})
