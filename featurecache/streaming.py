"""Logistic heads for features larger than memory: stream the cache shard by shard.

The in-memory logistic head holds every feature at once. Past a memory budget,
`fit_streaming_logistic` keeps only one shard in memory: a first pass gathers the
standardisation statistics, then the whole C grid is trained together by minibatch
Adam with a cosine schedule. Every minibatch updates all G models, so the data is
read once per epoch whatever the grid size; C is chosen on the streamed validation
split. The result is an ordinary `LogisticHead`, saved and used like any other.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .heads import LogisticHead
from .linear import DEFAULT_CS
from .shards import read_rows
from .store import Cache

log = logging.getLogger("featurecache")


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


def _batches(cache: Cache, split: str, tap: str, batch_size: int, rng: np.random.Generator | None
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches of one shard at a time; shuffled (shards and rows) when `rng` is given."""
    shards = [s for s in cache.manifest["shards"] if s["split"] == split]
    order = rng.permutation(len(shards)) if rng is not None else range(len(shards))
    for position in order:
        shard = shards[position]
        rows = read_rows(cache.path / shard["file"], shard["rows"], {tap: cache.tap_shapes[tap]})
        features = torch.from_numpy(rows.features[tap].reshape(len(rows), -1).astype(np.float32))
        labels = torch.from_numpy(rows.labels)
        index = torch.from_numpy(rng.permutation(len(rows))) if rng is not None else torch.arange(len(rows))
        for start in range(0, len(rows), batch_size):
            pick = index[start : start + batch_size]
            yield features[pick], labels[pick]


def _statistics(cache: Cache, split: str, tap: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    total, squares, count = None, None, 0
    for features, _ in _batches(cache, split, tap, 1 << 16, None):
        values = features.double()
        total = values.sum(0) if total is None else total + values.sum(0)
        squares = values.square().sum(0) if squares is None else squares + values.square().sum(0)
        count += len(values)
    mean = total / count
    scale = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), scale.float(), count


def fit_streaming_logistic(cache: Cache, *, tap: str = "pool", val_split: str = "val",
                           Cs: list[float] | None = None, epochs: int = 10, batch_size: int = 1024,
                           lr: float = 1e-2, seed: int = 0) -> LogisticHead:
    """Fit the C grid on `train` by streaming minibatches; choose C on `val_split`."""
    Cs = [float(c) for c in (Cs or DEFAULT_CS)]
    mean, scale, count = _statistics(cache, "train", tap)
    width, n_classes = len(mean), len(cache.classes)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.zeros(len(Cs), width, n_classes, requires_grad=True)
    bias = torch.zeros(len(Cs), 1, n_classes, requires_grad=True)
    with torch.no_grad():
        weight.normal_(0, 1e-3, generator=generator)
    # Same objective as the in-memory head: mean cross-entropy + ||W||^2 / (2 C N).
    strength = torch.tensor([1.0 / (c * count) for c in Cs]).view(-1, 1, 1)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    steps = epochs * sum(math.ceil(s["rows"] / batch_size) for s in cache.manifest["shards"] if s["split"] == "train")
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        for features, labels in _batches(cache, "train", tap, batch_size, rng):
            x = (features - mean) / scale
            logits = torch.einsum("nd,gdk->gnk", x, weight) + bias
            data_loss = F.cross_entropy(logits.reshape(-1, n_classes), labels.repeat(len(Cs)), reduction="sum")
            loss = data_loss / len(labels) + 0.5 * (strength * weight.square()).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        log.info("streaming logistic: epoch %d/%d", epoch + 1, epochs)
    correct, losses, seen = torch.zeros(len(Cs)), torch.zeros(len(Cs)), 0
    with torch.no_grad():
        for features, labels in _batches(cache, val_split, tap, batch_size, None):
            log_probs = torch.log_softmax(torch.einsum("nd,gdk->gnk", (features - mean) / scale, weight) + bias, 2)
            correct += (log_probs.argmax(2) == labels).sum(1)
            losses -= log_probs.gather(2, labels.view(1, -1, 1).expand(len(Cs), -1, 1)).squeeze(2).sum(1)
            seen += len(labels)
    best = max(range(len(Cs)), key=lambda g: (float(correct[g]), -float(losses[g])))
    head = LogisticHead(C=Cs[best], device="cpu", n_classes=n_classes)
    network = head._build_network(width, n_classes)
    with torch.no_grad():
        network.standardize.mean.copy_(mean)
        network.standardize.scale.copy_(scale)
        network.classifier.weight.copy_(weight[best].T)
        network.classifier.bias.copy_(bias[best, 0])
    head.network_, head.classes_, head.n_features_in_ = network.eval(), np.arange(n_classes), width
    head.best_params_ = {"C": Cs[best]}
    head.sweep_ = [{"C": c, "val_top1": float(correct[g]) / max(seen, 1), "val_log_loss": float(losses[g]) / max(seen, 1),
                    "fitted": True} for g, c in enumerate(Cs)]
    return head


def streamed_probabilities(head, cache: Cache, split: str, tap: str) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) of a split, computed shard by shard."""
    probabilities, labels = [], []
    for rows in cache.iter_shards(split, tap):
        probabilities.append(head.predict_proba(rows.features[tap].reshape(len(rows), -1)))
        labels.append(rows.labels)
    if not labels:
        return np.zeros((0, len(cache.classes)), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(probabilities), np.concatenate(labels)
