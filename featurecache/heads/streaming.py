"""Heads fitted on features larger than memory, streaming the cache shard by shard.

Each returns an ordinary head of its type, saved and used like any other:

- logistic: a first pass gathers the standardisation statistics, then the whole C
  grid is trained together by minibatch Adam with a cosine schedule; every minibatch
  updates all G models, so the data is read once per epoch whatever the grid size.
- mlp: the same architecture and lr x weight_decay grid as `MLPHead`, every setting
  trained on the same shuffled minibatches (one read per epoch), validated by
  streaming after each epoch, with early stopping keeping each setting's best epoch.
- knn: the bank is the cache's train split itself. Validation blocks are searched
  against it shard by shard with a running top-k; the saved head references the
  split instead of holding it, so it predicts by streaming and cannot be exported.

Each is reached through its head's `fit_streamed` (the streaming capability of the
`Head` base), with the head's own parameters, as in memory. Hyper-parameters are chosen
on the streamed validation split.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..device import cuda_devices, resolve_device
from .mlp import EarlyStopping
from ..cache.store import Cache
from ..cache.streaming import (bank_reader, feature_statistics, in_memory_bytes, shard_batches, split_blocks,
                        steps_per_epoch)

if TYPE_CHECKING:
    from .knn import KNNHead
    from .logistic import LogisticHead
    from .mlp import MLPHead

log = logging.getLogger("featurecache")


@dataclass(frozen=True)
class StreamedData:
    """Where a streamed head reads: a cache's `train` split of one tap, validated on `val_split`."""

    cache: Cache
    tap: str = "pool"
    val_split: str = "val"
    seed: int = 0  # minibatch order (and the logistic head's initial weights)
    block_rows: int = 0  # k-NN queries searched per block (whole shards; one shard when 0)


def fit_streaming_logistic(head: LogisticHead, data: StreamedData) -> LogisticHead:
    """Fit `head`'s C grid on `train` by streaming minibatches; choose C on the val split."""
    cache, tap, val_split, seed = data.cache, data.tap, data.val_split, data.seed
    Cs, epochs, batch_size, lr = head._Cs(), head.stream_epochs, head.stream_batch_size, head.stream_lr
    mean, scale, count = feature_statistics(cache, "train", tap)
    width, n_classes = len(mean), len(cache.classes)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.zeros(len(Cs), width, n_classes, requires_grad=True)
    bias = torch.zeros(len(Cs), 1, n_classes, requires_grad=True)
    with torch.no_grad():
        weight.normal_(0, 1e-3, generator=generator)
    # Same objective as the in-memory head: mean cross-entropy + ||W||^2 / (2 C N).
    strength = torch.tensor([1.0 / (c * count) for c in Cs]).view(-1, 1, 1)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, max(1, epochs * steps_per_epoch(cache, "train", batch_size)))
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        for features, labels in shard_batches(cache, "train", tap, batch_size, rng):
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
        for features, labels in shard_batches(cache, val_split, tap, batch_size, None):
            log_probs = torch.log_softmax(torch.einsum("nd,gdk->gnk", (features - mean) / scale, weight) + bias, 2)
            correct += (log_probs.argmax(2) == labels).sum(1)
            losses -= log_probs.gather(2, labels.view(1, -1, 1).expand(len(Cs), -1, 1)).squeeze(2).sum(1)
            seen += len(labels)
    best = max(range(len(Cs)), key=lambda g: (float(correct[g]), -float(losses[g])))
    network = _standardized(head, mean, scale, n_classes)
    with torch.no_grad():
        network.classifier.weight.copy_(weight[best].T)
        network.classifier.bias.copy_(bias[best, 0])
    head.network_, head.classes_, head.n_features_in_ = network.eval(), np.arange(n_classes), width
    head.best_params_ = {"C": Cs[best]}
    head.sweep_ = [{"C": c, "val_top1": float(correct[g]) / max(seen, 1), "val_log_loss": float(losses[g]) / max(seen, 1),
                    "fitted": True} for g, c in enumerate(Cs)]
    head.sweep_rows_ = count  # every streamed row took part in choosing C
    return head


def _standardized(head: LogisticHead | MLPHead, mean: torch.Tensor, scale: torch.Tensor, n_classes: int) -> nn.Module:
    network = head._build_network(len(mean), n_classes)
    with torch.no_grad():
        network.standardize.mean.copy_(mean)
        network.standardize.scale.copy_(scale)
    return network


@dataclass
class _Setting:
    """One (lr, weight_decay) of the MLP grid, trained alongside the others."""

    lr: float
    weight_decay: float
    network: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    stopping: EarlyStopping
    history: list[dict] = field(default_factory=list)
    stopped: bool = False


def _validate(settings: list[_Setting], cache: Cache, split: str, tap: str, batch_size: int,
              device: torch.device) -> list[tuple[float, float]]:
    """(mean cross-entropy, top-1) of each network on a split, read once for all of them."""
    losses, correct, seen = [0.0] * len(settings), [0] * len(settings), 0
    for setting in settings:
        setting.network.eval()
    with torch.no_grad():
        for features, labels in shard_batches(cache, split, tap, batch_size, None):
            features, labels = features.to(device), labels.to(device)
            for index, setting in enumerate(settings):
                logits = setting.network(features)
                losses[index] += F.cross_entropy(logits, labels, reduction="sum").item()
                correct[index] += int((logits.argmax(dim=1) == labels).sum())
            seen += len(labels)
    return [(loss / max(seen, 1), right / max(seen, 1)) for loss, right in zip(losses, correct)]


def fit_streaming_mlp(head: MLPHead, data: StreamedData) -> MLPHead:
    """Fit `head`'s grid on `train` by streaming minibatches; choose on the val split."""
    cache, tap, val_split = data.cache, data.tap, data.val_split
    device = resolve_device(head.device)
    mean, scale, count = feature_statistics(cache, "train", tap)
    n_classes = len(cache.classes)
    steps = head.epochs * steps_per_epoch(cache, "train", head.batch_size)
    settings: list[_Setting] = []
    # fork_rng seeds weight init and dropout but leaves the caller's RNG as it was.
    with torch.random.fork_rng(devices=cuda_devices(device)):
        for lr, weight_decay in head._settings():
            torch.manual_seed(head.seed)  # every setting starts from the same weights, as in memory
            network = _standardized(head, mean, scale, n_classes).to(device)
            optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=weight_decay)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
            settings.append(_Setting(lr, weight_decay, network, optimizer, schedule,
                                     EarlyStopping(head.patience, head.epochs)))
        rng = np.random.default_rng(head.seed)
        for epoch in range(1, head.epochs + 1):
            active = [setting for setting in settings if not setting.stopped]
            if not active:
                break
            _train_epoch(active, shard_batches(cache, "train", tap, head.batch_size, rng), count, device)
            scores = _validate(active, cache, val_split, tap, 4 * head.batch_size, device)
            for setting, (val_loss, val_top1) in zip(active, scores):
                setting.history[-1].update(epoch=epoch, val_loss=val_loss, val_top1=val_top1)
                setting.stopped = setting.stopping.update(setting.network, epoch, (val_top1, -val_loss))
            log.info("streaming mlp: epoch %d/%d, %d of %d settings still training",
                     epoch, head.epochs, sum(not s.stopped for s in settings), len(settings))
    head.classes_, head.n_features_in_ = np.arange(n_classes), len(mean)
    head.keep_best([(s.lr, s.weight_decay, s.stopping.state or s.network.state_dict(), s.history,
                     s.stopping.epoch, s.stopping.score) for s in settings], len(mean), n_classes)
    return head


def _train_epoch(settings: list[_Setting], batches, count: int, device: torch.device) -> None:
    """One pass over the minibatches, each one stepping every setting."""
    totals = [torch.zeros((), device=device) for _ in settings]
    for setting in settings:
        setting.network.train()
    for features, labels in batches:
        features, labels = features.to(device), labels.to(device)
        for index, setting in enumerate(settings):
            loss = F.cross_entropy(setting.network(features), labels)
            setting.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            setting.optimizer.step()
            setting.schedule.step()
            totals[index] += loss.detach() * len(labels)
    for setting, total in zip(settings, totals):
        setting.history.append({"epoch": None, "train_loss": total.item() / count, "val_loss": None, "val_top1": None})


def fit_streaming_knn(head: KNNHead, data: StreamedData) -> KNNHead:
    """`head` with the cache's train split on disk as its bank; k chosen on the val split,
    searched in blocks of up to `data.block_rows` rows."""
    cache, tap, val_split, block_rows = data.cache, data.tap, data.val_split, data.block_rows
    rows, n_classes = cache.splits["train"], len(cache.classes)
    head.bank_source_ = {"split": "train", "tap": tap, "rows": rows,
                         "bytes": in_memory_bytes(cache, tap, list(cache.labeled_splits))}
    head.bank_reader_ = bank_reader(cache, "train", tap)
    head.classes_, head.n_features_in_ = np.arange(n_classes), math.prod(cache.tap_shapes[tap])
    head.choose_k(head.bank_ks(rows), split_blocks(cache, val_split, tap, block_rows),
                  n_classes)
    return head
