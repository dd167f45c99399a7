"""D. `--decode torch` against PIL: decode + resize + crop per image, and end to end.

Per image, in this one thread (no workers, no overlap): PIL's path (`load_rgb` +
`prepare_image`) against the torch path (`read_encoded` + torchvision.io decode +
antialiased tensor resize + crop), on the same files, interleaved. Then whole
`extract` runs with `--decode pil` and `--decode torch` (both with the default
workers), and how far apart the two paths' features are. On a GPU the torch path
decodes a batch of JPEGs at once with nvJPEG; `python -m benchmarks --gpu` measures that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featurecache import extract, open_cache
from featurecache.data.images import load_rgb
from featurecache.backbones.preprocess import prepare_image
from featurecache.backbones.tensor_decode import decode_one, read_encoded, resize_crop

from .breakdown import preprocessing
from .common import Config, Row, interleaved
from .extraction import datasets, ours_spec


def per_image_ms(config: Config, files: list[Path]) -> dict[str, float]:
    pre = preprocessing(config)
    seconds = interleaved({
        "pil": lambda: [prepare_image(load_rgb(f), pre) for f in files],
        "torch": lambda: [resize_crop(decode_one(read_encoded(f)), pre) for f in files],
    }, repeats=config.repeats)
    return {name: 1000 * value / len(files) for name, value in seconds.items()}


def feature_gap(pil_path: Path, torch_path: Path) -> tuple[float, float]:
    """(median, max) relative L2 difference of the two paths' features, per image."""
    a = open_cache(pil_path).features("train").astype(np.float32)
    b = open_cache(torch_path).features("train").astype(np.float32)
    relative = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    return float(np.median(relative)), float(relative.max())


def run(config: Config) -> list[Row]:
    rows = []
    for label, folder, count in datasets(config):
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        ms = per_image_ms(config, files)
        rows.append(Row("D", f"decode + resize, torch vs PIL, ms/img: {label}", ms["torch"], ms["pil"], "ms",
                        higher_is_better=False, note="one thread, CPU"))
        paths: dict[str, Path] = {}

        def run_extract(decode: str) -> None:  # a fresh cache root each time: never a cache hit
            paths[decode] = extract(ours_spec(config, folder, decode=decode)).path

        seconds = interleaved({"pil": lambda: run_extract("pil"), "torch": lambda: run_extract("torch")},
                              repeats=config.repeats)
        median, worst = feature_gap(paths["pil"], paths["torch"])
        rows.append(Row("D", f"extract --decode torch vs pil: {label}", count / seconds["torch"],
                        count / seconds["pil"], "img/s",
                        note=f"features rel. L2 diff median {median:.1e}, max {worst:.1e}"))
    return rows
