"""Compute augmented views of the train rows (`extract --views K --augment POLICY`).

Each view is decided by (view seed, the image's fingerprint, view index) alone: its
crop box and flip come from a generator seeded with those three, never from a global
RNG, the batch, the worker or the resume point, so a killed and resumed run writes the
same bytes as an uninterrupted one. Rows are in source order, cut into blocks of
`shard_size`; view v of block b is one shard, batches never straddle a shard, and the
view manifest (see cache/views.py) is rewritten atomically after each shard. Only the
shards of views the set lacks are computed: asking for K=4 after K=2 computes views 2
and 3.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from ..backbones.preprocess import prepare_image
from ..backbones.registry import Preprocessing
from ..cache.atomic import is_temporary
from ..cache.shards import ShardRows, ShardWriter, read_fingerprints
from ..cache.layout import MANIFEST, SHARDS_DIR, shard_file
from ..cache.store import entry_lock
from ..cache.views import (ViewPolicy, parse_policy, read_view_manifest, view_dir, view_key, view_shard,
                           write_view_manifest, available_views)
from ..data.images import ImageDecodeError
from ..data.sources import Sample, Source
from ..errors import ExtractionError
from ..faults import fault_point
from .engine import run_backbone

log = logging.getLogger("featurecache")


@dataclass
class ViewsResult:
    key: str
    path: Path
    augment: str
    seed: int
    views: int  # complete views the set holds now
    computed: int  # (image, view) pairs run through the backbone in this call
    seconds: float


def view_generator(seed: int, fingerprint: str, view: int) -> np.random.Generator:
    """The random source of one view of one image: nothing else feeds it."""
    digest = int.from_bytes(hashlib.sha256(fingerprint.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest, view])


def crop_box(rng: np.random.Generator, width: int, height: int, scale: Sequence[float],
             ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop: torchvision's RandomResizedCrop
    algorithm (10 tries, then the centre crop clamped to `ratio`), drawn from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augmented_view(image: Image.Image, policy: ViewPolicy, preprocessing: Preprocessing,
                   rng: np.random.Generator) -> torch.Tensor:
    """One view as a 3 x S x S uint8 tensor: a random resized crop of the decoded image at the
    crop size (or the plain resize + centre crop for `flip`), then a flip with probability 1/2."""
    if policy.scale is None:
        tensor = prepare_image(image, preprocessing)
    else:
        top, left, h, w = crop_box(rng, image.width, image.height, policy.scale, policy.ratio)
        size = [preprocessing.crop_size, preprocessing.crop_size]
        tensor = F.pil_to_tensor(F.resized_crop(image, top, left, h, w, size,
                                                interpolation=InterpolationMode(preprocessing.interpolation),
                                                antialias=True))
    if policy.hflip and rng.random() < 0.5:
        tensor = tensor.flip(-1)
    return tensor


class _ViewDataset(Dataset):
    def __init__(self, source: Source, items: list[tuple[Sample, int]], preprocessing: Preprocessing,
                 policy: ViewPolicy, seed: int) -> None:
        self.source, self.items, self.preprocessing, self.policy, self.seed = source, items, preprocessing, policy, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int):
        fault_point("worker_load")
        sample, view = self.items[position]
        try:
            image = self.source.load(sample)
        except ImageDecodeError as error:
            return position, None, error.reason
        rng = view_generator(self.seed, sample.fingerprint, view)
        return position, augmented_view(image, self.policy, self.preprocessing, rng), ""


def _train_samples(path: Path, manifest: dict, source: Source) -> list[Sample]:
    """The entry's train rows (those its shards hold), in source order."""
    held: set[str] = set()
    for record in manifest["shards"]:
        if record["split"] == "train":
            held.update(read_fingerprints(path / record["file"]))
    return [s for s in source.samples if s.split == "train" and s.fingerprint in held]


def _clean(directory: Path, listed: set[str]) -> None:
    """Temporary files of killed writers and shards no manifest lists (the caller holds the lock)."""
    for file in sorted((directory / SHARDS_DIR).iterdir()):
        if is_temporary(file.name) or shard_file(file.name) not in listed:
            file.unlink(missing_ok=True)
    for file in directory.iterdir():
        if is_temporary(file.name) and file.is_file():
            file.unlink(missing_ok=True)


def extend_views(*, path: Path, manifest: dict, source: Source, spec, model_factory: Callable, taps: Sequence[str],
                 device: torch.device, precision: str, preprocessing: Preprocessing, workers: int,
                 progress: Callable[[int, int], None] | None) -> ViewsResult:
    """Make sure the view set of (entry, policy, view seed) holds `spec.views` views; compute
    only the (view, block) shards it lacks."""
    started = time.perf_counter()
    policy = parse_policy(spec.augment)
    key = view_key(manifest["key"], policy, spec.view_seed)
    directory = view_dir(path, key)
    with entry_lock(path, spec.lock_timeout):
        (directory / "shards").mkdir(parents=True, exist_ok=True)
        samples = _train_samples(path, manifest, source)
        if (directory / MANIFEST).exists():
            views = read_view_manifest(directory)
            views.pop("checksum", None)
            if views["view_key"] != key or views["rows"] != len(samples):
                raise ExtractionError(f"the view set {directory} does not match this entry's train rows; "
                                      "delete the folder and extract the views again")
            views["requested"] = max(views["requested"], spec.views)
        else:
            views = {"kind": "views", "views_format": 1, "view_key": key, "entry_key": manifest["key"],
                     "entry_id": manifest["entry_id"], "augment": policy.text, "policy": policy.to_dict(),
                     "seed": spec.view_seed, "requested": spec.views, "rows": len(samples),
                     "blocks": math.ceil(len(samples) / spec.shard_size), "shard_size": spec.shard_size,
                     "dtype": manifest["dtype"], "taps": manifest["taps"], "shards": []}
        listed = {r["file"] for r in views["shards"]}
        _clean(directory, listed)
        size = views["shard_size"]
        todo = [(view, block) for view in range(spec.views) for block in range(views["blocks"])
                if view_shard(view, block) not in listed]
        write_view_manifest(directory, views)
        computed = 0
        if todo:
            computed = _compute(directory, views, todo, samples, size, source, spec, model_factory(), taps,
                                device, precision, preprocessing, policy, workers, progress)
    return ViewsResult(key, directory, policy.text, spec.view_seed, available_views(views), computed,
                       time.perf_counter() - started)


def _compute(directory: Path, views: dict, todo: list[tuple[int, int]], samples: list[Sample], size: int,
             source: Source, spec, model, taps, device, precision, preprocessing, policy, workers, progress) -> int:
    items, shards = [], []  # shards: (view, block, start, stop) in `items`
    for view, block in todo:
        chunk = samples[block * size : (block + 1) * size]
        shards.append((view, block, len(items), len(items) + len(chunk)))
        items += [(sample, view) for sample in chunk]
    batches = [list(range(start, min(start + spec.batch_size, stop)))
               for _, _, start, stop in shards for start in range(start, stop, spec.batch_size)]
    tap_shapes = {t: tuple(info["shape"]) for t, info in views["taps"].items()}
    dataset = _ViewDataset(source, items, preprocessing, policy, views["seed"])
    current, writer, done = 0, None, 0
    try:
        for batch in run_backbone(model, source, [s for s, _ in items], preprocessing=preprocessing, taps=taps,
                                  device=device, precision=precision, dtype=views["dtype"], batches=batches,
                                  num_workers=workers, dataset=dataset):
            if batch.failures:
                position, reason = batch.failures[0]
                raise ExtractionError(f"cannot read {items[position][0].path} ({reason}) for its views, though the "
                                      "entry holds it; the source changed: extract the plain features again first")
            view, block, start, stop = shards[current]
            if writer is None:
                writer = ShardWriter(directory / view_shard(view, block), tap_shapes=tap_shapes, dtype=views["dtype"],
                                     capacity=stop - start, attrs={
                                         "entry_id": views["entry_id"], "view_key": views["view_key"],
                                         "view": str(view), "split": "train", "skipped": "[]",
                                         "featurecache_format": "1"})
            chosen = [items[p][0] for p in batch.positions]
            writer.append(ShardRows(features=batch.features,
                                    labels=np.array([s.label for s in chosen], dtype=np.int64),
                                    index=np.array([s.index for s in chosen], dtype=np.int64),
                                    paths=[s.path for s in chosen], fingerprints=[s.fingerprint for s in chosen]))
            done += len(batch.positions)
            if batch.positions[-1] == stop - 1:
                record = {"file": view_shard(view, block), "view": view, **writer.commit()}
                writer, current = None, current + 1
                views["shards"].append(record)
                views["shards"].sort(key=lambda r: (r["view"], r["file"]))
                write_view_manifest(directory, views)
                fault_point("after_manifest")
            if progress:
                progress(done, len(items))
    finally:
        if writer is not None:
            writer.abort()
    return done
