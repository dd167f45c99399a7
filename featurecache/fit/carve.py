"""Validation carved from train (`--val-fraction`): stratified, seeded, and decided by the rows' identities.

Which rows go to validation depends on each row's relative path (with the seed), never on
its position in the split: an entry extracted incrementally appends its new shards
after the old ones, so two entries of the same key, one updated and one made in one go,
hold the same rows in different orders and must carve the same rows. Within each class
the rows are ranked by a hash of (seed, path); the class's share (largest remainders,
ties broken by the seed) is taken from the top.

Heads fitted before this rule carved by position (`carve` absent from their record's
`validation`); their rows are still found the old way, so an ensemble or finetune of such
a head is scored on the rows it really held out.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from ..errors import HeadError

if TYPE_CHECKING:
    from ..cache.store import Cache

#: `validation["carve"]` of a head whose carved rows are decided by path (absent: by position).
BY_PATH = "path"


def _ranks(keys: list, seed: int) -> np.ndarray:
    """Each key's rank in the seed's order of all keys (a hash of seed and key; equal keys by position)."""
    digests = []
    for key in keys:
        text = key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else str(key)
        digest = hashlib.blake2b(f"{seed}\0{text}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
        digests.append(int.from_bytes(digest, "big"))
    order = np.argsort(np.array(digests, dtype=np.uint64), kind="stable")
    ranks = np.empty(len(keys), np.int64)
    ranks[order] = np.arange(len(keys))
    return ranks


def stratified_split(labels: np.ndarray, fraction: float, seed: int,
                     keys: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val), sorted: `fraction` of the rows to validation, spread over the
    classes in proportion to their size (largest remainders, ties broken by `seed`).

    With `keys` (one identity per row: its path), a class's validation rows are those whose
    keys rank first in the seed's order, whatever their positions; without, a seeded
    permutation of positions (heads fitted before keys were used).

    Works for any number of classes: a class too small for its share gets no validation
    row rather than failing the split, and a class with a single row always stays in
    train (a class needs a training row to be learned at all)."""
    if not 0 < fraction < 1:
        raise HeadError(f"--val-fraction must be between 0 and 1 (exclusive), got {fraction}")
    if keys is not None and len(keys) != len(labels):
        raise HeadError(f"{len(keys)} row keys for {len(labels)} rows")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    if keys is None:
        rows = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    else:
        ranks = _ranks(keys, seed)
        rows = {}
        for c in classes:
            members = np.flatnonzero(labels == c)
            rows[c] = members[np.argsort(ranks[members], kind="stable")]
    eligible = [c for c in classes if len(rows[c]) >= 2]
    target = int(round(fraction * sum(len(rows[c]) for c in eligible)))
    quota = {c: fraction * len(rows[c]) for c in eligible}
    take = {c: min(int(quota[c]), len(rows[c]) - 1) for c in eligible}
    order = sorted(eligible, key=lambda c: (-(quota[c] - int(quota[c])), rng.random()))
    for c in order:  # hand out the remaining rows, largest remainder first, never emptying a class
        if sum(take.values()) >= target:
            break
        if take[c] < len(rows[c]) - 1:
            take[c] += 1
    val = [rows[c][: take.get(c, 0)] for c in classes]
    train = [rows[c][take.get(c, 0):] for c in classes]
    val_rows = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    if len(val_rows) == 0:
        raise HeadError(f"{len(labels)} training rows are too few to carve a validation split of {fraction:g} "
                        "(every class needs two rows to give one to validation); extract a val split, or pass "
                        "--val-fraction larger")
    return np.sort(np.concatenate(train)), val_rows


def carve(cache: "Cache", fraction: float, seed: int, how: str | None = BY_PATH) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions in `cache`'s train split: by path (`BY_PATH`), or by position (None: old heads)."""
    keys = cache.paths("train") if how == BY_PATH else None
    return stratified_split(cache.labels("train"), fraction, seed, keys)


def carved_rows(cache: "Cache", validation: dict) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions of the rows a head record's `validation` (split "train") carved."""
    return carve(cache, validation["fraction"], validation["seed"], validation.get("carve"))
