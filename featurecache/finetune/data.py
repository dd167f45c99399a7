"""Finetune data and loops: batches of images or of cached activations, one epoch, evaluation.

Two kinds of batches feed the same model. `ImageRows` decodes the cache's source images
(random resized crop and flip when augmenting, else exactly extract's resize and
centre crop). `TapRows` serves the activations the cache stored at the input of the
unfrozen blocks, read from the shards one batch at a time: no decoding and no forward
pass through the frozen part, but also no augmentation, since the activations were
computed once from the centre crop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from ..backbones.registry import Preprocessing
from ..device import autocast
from ..errors import ExtractionError
from ..data.images import ImageDecodeError
from ..heads.metrics import classification_metrics
from ..backbones.preprocess import normalize_batch, prepare_image
from ..cache.shards import RowReader
from ..data.sources import Sample, Source

Progress = Callable[[dict], None]


@dataclass(frozen=True, kw_only=True)
class Augmentation:
    """Standard training augmentation at the cache's input size."""

    scale: tuple[float, float] = (0.25, 1.0)  # area fraction of RandomResizedCrop
    hflip: bool = True


class _ImageDataset(Dataset):
    def __init__(self, source: Source, samples: Sequence[Sample], preprocessing: Preprocessing,
                 augmentation: Augmentation | None) -> None:
        self.source, self.samples, self.preprocessing = source, samples, preprocessing
        self.transform = None
        if augmentation is not None:
            interpolation = transforms.InterpolationMode(preprocessing.interpolation)
            steps = [transforms.RandomResizedCrop(preprocessing.crop_size, scale=augmentation.scale,
                                                  interpolation=interpolation, antialias=True)]
            if augmentation.hflip:
                steps.append(transforms.RandomHorizontalFlip())
            self.transform = transforms.Compose([*steps, transforms.PILToTensor()])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, position: int) -> torch.Tensor:
        sample = self.samples[position]
        try:
            image = self.source.load(sample)
        except ImageDecodeError as error:
            raise ExtractionError(f"cannot read {sample.path} ({error.reason}), which the cache holds; "
                                  "the source changed since extraction: extract it again") from None
        if self.transform is None:
            return prepare_image(image, self.preprocessing)
        return self.transform(image)


class ImageRows:
    """Rows of a split as decoded images (uint8 on the CPU, normalised on the device)."""

    from_tap = False

    def __init__(self, source: Source, samples: Sequence[Sample], labels: np.ndarray,
                 preprocessing: Preprocessing, *, workers: int) -> None:
        self.source, self.samples, self.preprocessing, self.workers = source, samples, preprocessing, workers
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.samples)

    def batches(self, order: list[list[int]], device: torch.device,
                augmentation: Augmentation | None = None, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dataset = _ImageDataset(self.source, self.samples, self.preprocessing, augmentation)
        loader = DataLoader(dataset, batch_sampler=order, num_workers=self.workers,
                            generator=torch.Generator().manual_seed(seed),  # seeds the workers' transforms
                            pin_memory=device.type == "cuda", prefetch_factor=4 if self.workers else None)
        for rows, images in zip(order, loader):
            x = normalize_batch(images.to(device, non_blocking=True), self.preprocessing)
            yield x, self.labels[rows].to(device)


class TapRows:
    """Rows of a split as the cached activations of one tap (the fast path), read from the
    shards batch by batch: memory holds one batch, whatever the size of the split."""

    from_tap = True

    def __init__(self, reader: RowReader, rows: np.ndarray, labels: np.ndarray) -> None:
        self.reader, self.rows = reader, np.asarray(rows, dtype=np.int64)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, order: list[list[int]], device: torch.device,
                augmentation: Augmentation | None = None, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for rows in order:
            x = torch.from_numpy(self.reader.read(self.rows[np.asarray(rows)])).to(device).float()
            if x.ndim == 4:  # feature maps; a ViT's token sequences are (rows, tokens, width)
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[rows].to(device)


def epoch_order(n: int, batch_size: int, generator: torch.Generator | None) -> list[list[int]]:
    """Row batches, shuffled when a generator is given; a last batch of one row joins the previous
    one, since BatchNorm in training mode cannot normalise a single 1x1 activation."""
    rows = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    order = [rows[start : start + batch_size] for start in range(0, n, batch_size)]
    if len(order) > 1 and len(order[-1]) == 1:
        last = order.pop()  # popped first: `order[-2] += order.pop()` indexes after the pop
        order[-1] += last
    return order


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from `base` to zero over `total` steps."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def train_epoch(model: torch.nn.Module, rows: ImageRows | TapRows, *, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, step: int, total_steps: int, batch_size: int,
                generator: torch.Generator, augmentation: Augmentation | None, device: torch.device,
                precision: str, seed: int, progress: Progress | None, epoch: int) -> tuple[dict, int]:
    """One pass over the training rows; returns (loss/top-1 on the training batches, new step)."""
    model.train()
    order = epoch_order(len(rows), batch_size, generator)
    seen, loss_sum, correct = 0, 0.0, 0
    for x, y in rows.batches(order, device, augmentation, seed):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(group["base_lr"], step, total_steps)
        with autocast(device, precision):
            logits = model(x, from_tap=rows.from_tap).float()
            loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise ExtractionError(f"the training loss became {loss.item()} at epoch {epoch}; lower --lr or --backbone-lr")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        seen += len(y)
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        if progress:
            progress({"phase": "train", "epoch": epoch, "done": seen, "total": len(rows),
                      "loss": loss_sum / seen, "top1": correct / seen})
    return {"train_loss": loss_sum / max(seen, 1), "train_top1": correct / max(seen, 1)}, step


def evaluate(model: torch.nn.Module, rows: ImageRows | TapRows, classes: list[str], *, batch_size: int,
             device: torch.device, precision: str) -> dict:
    """Metrics of the model in evaluation mode (centre crops or cached activations), in row order."""
    model.eval()
    probabilities = []
    with torch.inference_mode(), autocast(device, precision):
        for x, _ in rows.batches(epoch_order(len(rows), batch_size, None), device):
            probabilities.append(torch.softmax(model(x, from_tap=rows.from_tap).float(), dim=1).cpu())
    values = torch.cat(probabilities).numpy() if probabilities else np.zeros((0, len(classes)), np.float32)
    return classification_metrics(values, rows.labels.numpy(), classes)
