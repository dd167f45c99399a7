"""Reading a cache out of core: one shard in memory at a time.

What the streaming heads (`featurecache.streaming_heads`) share: the memory budget,
shuffled minibatches shard by shard, standardisation statistics gathered in one pass,
the bank reader of a streamed k-NN head, and split-by-split evaluation.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .manifest import shard_records
from .shards import read_split_features
from .store import Cache


def available_memory() -> int:
    """Bytes of RAM available now (Linux), or a conservative 4 GiB elsewhere."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def in_memory_bytes(cache: Cache, tap: str, splits: list[str]) -> int:
    """What fitting in memory would hold: float32 features of these splits."""
    width = math.prod(cache.tap_shapes[tap])
    return sum(cache.splits.get(split, 0) for split in splits) * width * 4


def shard_batches(cache: Cache, split: str, tap: str, batch_size: int | None, rng: np.random.Generator | None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 features (n, D), labels) minibatches of one shard at a time (whole shards when
    `batch_size` is None); shards and rows shuffled when `rng` is given."""
    shards = shard_records(cache.manifest, split)
    starts = np.cumsum([0] + [s["rows"] for s in shards])
    split_labels = torch.from_numpy(cache.labels(split))  # small: read once, sliced per shard
    shape = cache.tap_shapes[tap]
    order = rng.permutation(len(shards)) if rng is not None else range(len(shards))
    for position in order:
        shard, count = shards[position], shards[position]["rows"]
        if count == 0:
            continue
        # Only the features (checked) and labels: paths and fingerprints are not read on this hot path.
        values = np.empty((count, *shape), dtype=cache.manifest["dtype"])
        read_split_features([(cache.path / shard["file"], count, shard)], tap, shape, values)
        stored = torch.from_numpy(values.reshape(count, -1))  # float16 mostly: half the bytes
        labels = split_labels[starts[position] : starts[position + 1]]
        size = batch_size or count
        if rng is None:
            for features, batch_labels in zip(stored.split(size), labels.split(size)):
                yield features.float(), batch_labels
            continue
        index = torch.from_numpy(rng.permutation(count))
        for start in range(0, count, size):
            pick = index[start : start + size]
            yield stored[pick].float(), labels[pick]


def steps_per_epoch(cache: Cache, split: str, batch_size: int) -> int:
    """How many minibatches `shard_batches` yields for one pass over a split."""
    return sum(math.ceil(s["rows"] / batch_size) for s in shard_records(cache.manifest, split))


def feature_statistics(cache: Cache, split: str, tap: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-feature mean and std (floored at 1e-6) of a split in one pass, and its row count."""
    total, squares, count = None, None, 0
    for features, _ in shard_batches(cache, split, tap, 256, None):  # float64 copies of 256 rows at most
        values = features.double()
        total = values.sum(0) if total is None else total + values.sum(0)
        squares = values.square().sum(0) if squares is None else squares + values.square().sum(0)
        count += len(values)
    mean = total / count
    scale = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), scale.float(), count


BANK_CHUNK_ROWS = 1024  # float32 rows of a streamed k-NN bank widened at a time: 8 MiB at 2048-d


def bank_reader(cache: Cache, split: str, tap: str) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """What a streamed k-NN head searches: the split's (float32 features, labels), one shard
    read at a time and widened `BANK_CHUNK_ROWS` rows at a time."""
    return functools.partial(shard_batches, cache, split, tap, BANK_CHUNK_ROWS, None)


def split_blocks(cache: Cache, split: str, tap: str, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(float32 features, labels) of a split in blocks of at most `rows` rows, in order (one
    shard per block when `rows` <= 0)."""
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    count = 0
    for shard_features, shard_labels in shard_batches(cache, split, tap, rows if rows > 0 else None, None):
        if features and count + len(shard_labels) > rows:
            yield _joined(features), _joined(labels)
            features, labels, count = [], [], 0
        features.append(shard_features)
        labels.append(shard_labels)
        count += len(shard_labels)
    if features:
        yield _joined(features), _joined(labels)


def _joined(parts: list[torch.Tensor]) -> np.ndarray:
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).numpy()


def streamed_probabilities(head, cache: Cache, split: str, tap: str, rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) of a split, in blocks of shards (see `split_blocks`) for a head
    that reads its own data per call (k-NN), else in batches of 1024 rows (`rows` <= 0)."""
    blocks = split_blocks(cache, split, tap, rows) if rows > 0 else (
        (features.numpy(), labels.numpy()) for features, labels in shard_batches(cache, split, tap, 1024, None))
    probabilities, labels = [], []
    for features, block_labels in blocks:
        probabilities.append(head.predict_proba(features))
        labels.append(block_labels)
    if not labels:
        return np.zeros((0, len(cache.classes)), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(probabilities), np.concatenate(labels)
