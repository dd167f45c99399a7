"""Run a frozen backbone over samples: workers decode, the device computes.

`run_backbone` yields, batch by batch and in order, the features of the samples that
decoded plus the failures (position, reason) of those that did not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..backbones.registry import Preprocessing, StagedBackbone
from ..errors import ExtractionError
from ..device import autocast
from ..faults import fault_point
from ..data.images import ImageDecodeError
from ..backbones.preprocess import normalize_batch, prepare_image
from ..data.sources import FileSource, Sample, Source

def default_workers() -> int:
    # Leave a core for the forward pass; decoding small images needs few workers.
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class _DecodeDataset(Dataset):
    """Workers' side: with `decode="pil"` PIL decodes and resizes; with "torch",
    torchvision does (`defer`: only reads the bytes, for the device to decode)."""

    def __init__(self, source: Source, samples: Sequence[Sample], preprocessing: Preprocessing,
                 decode: str = "pil", defer: bool = False) -> None:
        self.source, self.samples, self.preprocessing = source, samples, preprocessing
        self.decode, self.defer = decode, defer

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, position: int):
        fault_point("worker_load")
        try:
            if self.decode == "pil":
                image = self.source.load(self.samples[position])
                return position, prepare_image(image, self.preprocessing), ""
            from ..backbones import tensor_decode

            sample = self.samples[position]
            if isinstance(self.source, FileSource):
                item = tensor_decode.read_encoded(os.path.join(self.source.root, sample.path))
            else:
                item = tensor_decode.pixels(self.source.load(sample))
            if self.defer:
                return position, item, ""
            return position, tensor_decode.resize_crop(tensor_decode.decode_one(item), self.preprocessing), ""
        except ImageDecodeError as error:
            return position, None, error.reason


def _collate(items: list[tuple[int, object, str]]):
    good = [(p, t) for p, t, _ in items if t is not None]
    failures = [(p, reason) for p, t, reason in items if t is None]
    if good and not isinstance(good[0][1], torch.Tensor):  # deferred: encoded items, decoded on the device
        return [p for p, _ in good], [t for _, t in good], failures
    images = torch.stack([t for _, t in good]) if good else None
    return [p for p, _ in good], images, failures


def _decode_on_device(positions: list[int], items: list, failures: list[tuple[int, str]],
                      preprocessing: Preprocessing, device: torch.device):
    """Deferred items decoded (JPEGs batched) and resized on `device`."""
    from ..backbones import tensor_decode

    kept, images = [], []
    for position, image in zip(positions, tensor_decode.decode_batch(items, device)):
        if isinstance(image, ImageDecodeError):
            failures.append((position, image.reason))
        else:
            kept.append(position)
            images.append(tensor_decode.resize_crop(image, preprocessing))
    return kept, (torch.stack(images) if images else None), sorted(failures)


@dataclass
class Batch:
    positions: list[int]  # positions (in the given samples) of the rows in `features`
    features: dict[str, np.ndarray]
    failures: list[tuple[int, str]]  # (position, reason) of samples that did not decode


def run_backbone(model: StagedBackbone, source: Source, samples: Sequence[Sample], *,
                 preprocessing: Preprocessing, taps: Sequence[str], device: torch.device,
                 precision: str, dtype: str, batches: list[list[int]], num_workers: int,
                 decode: str = "pil", dataset: Dataset | None = None) -> Iterator[Batch]:
    """Yield features for `samples`, batch by batch in the given order of positions.

    Failures to decode are reported per batch. The caller fixes the batches: the same
    images in the same batch give bitwise-identical features, which a resumed run
    relies on to reproduce an uninterrupted one. `decode`: "pil" or "torch" (see
    tensor_decode.py; on a GPU the torch path decodes each batch there). `dataset`: yields
    (position, uint8 image or None, reason) in place of decoding `samples` (augmented views).
    """
    defer = decode == "torch" and device.type == "cuda" and dataset is None
    loader = DataLoader(
        dataset or _DecodeDataset(source, samples, preprocessing, decode, defer), batch_sampler=batches,
        num_workers=num_workers, collate_fn=_collate, pin_memory=device.type == "cuda" and not defer,
        prefetch_factor=4 if num_workers else None,
    )
    try:
        with torch.inference_mode(), autocast(device, precision):
            for positions, images, failures in loader:
                if defer and images is not None:
                    positions, images, failures = _decode_on_device(positions, images, failures, preprocessing,
                                                                    device)
                features: dict[str, np.ndarray] = {}
                if images is not None:
                    x = normalize_batch(images.to(device, non_blocking=True), preprocessing)
                    outputs = model(x, taps)
                    for tap in taps:
                        features[tap] = _to_storage(outputs[tap], dtype, [samples[p].path for p in positions])
                yield Batch(positions, features, failures)
    except (RuntimeError, ConnectionError, EOFError) as error:
        # A worker killed mid-batch surfaces either as torch's "DataLoader worker ... is
        # killed" or, when it dies while handing over a batch's shared memory, as a
        # reset connection; both mean the same to the user.
        if isinstance(error, RuntimeError) and "DataLoader worker" not in str(error):
            raise
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExtractionError(f"a data-loading worker died ({detail}); rerun to resume, "
                              "or use --workers 0 to decode in the main process") from None


def _to_storage(values: torch.Tensor, dtype: str, paths: list[str]) -> np.ndarray:
    values = values.float()
    finite = torch.isfinite(values).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = paths[int((~finite).nonzero()[0])]
        raise ExtractionError(f"the backbone produced NaN or inf features (first at {bad}); the weights may be broken")
    if dtype == "float16" and bool(values.abs().max() > 65504):
        raise ExtractionError("features exceed the float16 range; rerun with --dtype float32")
    return values.to(torch.float16 if dtype == "float16" else torch.float32).cpu().numpy()
