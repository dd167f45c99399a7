"""Small helpers shared by the tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from featurecache.extract.stage import ExtractSpec


def stderr_lines(result) -> list[str]:
    """stderr's lines, blank ones kept: a stray blank line before `error:` breaks the one-line rule."""
    return result.stderr.rstrip("\n").split("\n") if result.stderr else []


def write_image(path: Path, seed: int, size: int = 40, fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels[: size // 2] = (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)  # some structure
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def write_photo_folder(root: Path, counts: tuple[tuple[str, int], ...] = (("train", 5), ("val", 3)),
                       labels: tuple[str, ...] = ("ants", "bees")) -> Path:
    """An image folder root/<split>/<label>/<label>_<i>.png, each image seeded by its position."""
    seed = 0
    for split, count in counts:
        for label in labels:
            for i in range(count):
                seed += 1
                write_image(root / split / label / f"{label}_{i}.png", seed)
    return root


def replace_spec(spec: ExtractSpec, **changes) -> ExtractSpec:
    return dataclasses.replace(spec, **changes)


def flip_feature_byte(shard: Path, tap: str, at: int, mask: int = 0x01) -> None:
    """XOR one byte of a shard's stored features (contiguous, or in the first chunk)."""
    with h5py.File(shard, "r") as handle:
        dataset = handle[f"features/{tap}"]
        offset = dataset.id.get_offset() if dataset.chunks is None else dataset.id.get_chunk_info(0).byte_offset
    with open(shard, "r+b") as handle:
        handle.seek(offset + at)
        byte = handle.read(1)
        handle.seek(offset + at)
        handle.write(bytes([byte[0] ^ mask]))


def assert_features_of_the_same_images(computed: np.ndarray, cached: np.ndarray) -> None:
    """Features recomputed from the image files against the cached ones (float16 storage):
    rounded to float16 as the cache is, and each at most one float16 step from the cached
    value, or within float32 noise of the row's largest feature for small values (extract's
    BatchNorm-folded forward and the plain one sum in another order: measured 3.6e-7)."""
    assert cached.dtype == np.float16 and computed.shape == cached.shape
    np.testing.assert_array_equal(computed, computed.astype(np.float16).astype(np.float32))
    one_step = np.spacing(np.abs(cached)).astype(np.float32)  # float16's step at each cached value
    cached = cached.astype(np.float32)
    float32_noise = 1e-5 * np.abs(cached).max(axis=1, keepdims=True)
    assert (np.abs(computed - cached) <= np.maximum(one_step, float32_noise)).all()
    assert (computed != cached).mean() < 0.02  # measured: 31 of 6,144 values one step apart
