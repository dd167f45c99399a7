"""Small helpers shared by the tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from featurecache.extract import ExtractSpec


def write_image(path: Path, seed: int, size: int = 40, fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels[: size // 2] = (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)  # some structure
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def replace_spec(spec: ExtractSpec, **changes) -> ExtractSpec:
    return dataclasses.replace(spec, **changes)
