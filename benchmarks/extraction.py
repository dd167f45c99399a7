"""1. End-to-end extraction: `featurecache.extract` vs the naive loop, same images."""

from __future__ import annotations

import itertools
from pathlib import Path

from featurecache.extract.stage import ExtractSpec, extract

from .common import Config, Row, generated_jpegs, interleaved, subset_folder
from .naive import naive_extract

_counter = itertools.count()


def fresh_root(config: Config) -> Path:
    """A new cache root (so nothing is a cache hit) sharing one `_weights` folder.

    The backbone checkpoint is written once per weights, not once per run, so the
    timed runs do not include that one-off 100 MB write.
    """
    shared = config.workdir / "weights-store"
    shared.mkdir(parents=True, exist_ok=True)
    root = config.workdir / "roots" / f"r{next(_counter):04d}"
    root.mkdir(parents=True)
    (root / "_weights").symlink_to(shared, target_is_directory=True)
    return root


def ours_spec(config: Config, folder: Path, **overrides) -> ExtractSpec:
    settings = dict(source=str(folder), model=config.model, weights="random", image_size=config.image_size,
                    root=str(fresh_root(config)))
    if config.tiny:
        settings.update(workers=0, batch_size=4, optimize=config.forward_mode)
    settings.update(overrides)
    return ExtractSpec(**settings)


def datasets(config: Config) -> list[tuple[str, Path, int]]:
    """(label, folder, images): hymenoptera (when present) and generated JPEGs."""
    out = []
    if config.hymenoptera is not None:
        folder = subset_folder(config.hymenoptera, config.workdir / "data" / f"hymenoptera-{config.images}", config.images)
        out.append((f"hymenoptera photos (~500x375), {config.images}", folder, config.images))
    for width, height in config.generated_sizes:
        count = config.images if max(width, height) < 1000 else max(2, config.images // 2)
        folder = generated_jpegs(config.workdir / "data" / f"jpeg-{width}x{height}-{count}", (width, height), count)
        out.append((f"generated JPEG {width}x{height}, {count}", folder, count))
    return out


def run(config: Config) -> list[Row]:
    rows = []
    # Warm up both on a few images (imports, oneDNN kernels, page cache), untimed.
    warm = generated_jpegs(config.workdir / "data" / "warm-up", (320, 240), 4)
    naive_extract(warm, config.workdir / "naive.npy", model=config.model, image_size=config.image_size)
    extract(ours_spec(config, warm))
    for label, folder, count in datasets(config):
        seconds = interleaved({
            "naive": lambda: naive_extract(folder, config.workdir / "naive.npy", model=config.model,
                                           image_size=config.image_size),
            "ours": lambda: extract(ours_spec(config, folder)),
        }, repeats=config.repeats, warmup=0)
        rows.append(Row("1", f"extract {label}", count / seconds["ours"], count / seconds["naive"], "img/s",
                        target=">= 3x", note=f"{config.model}"))
    return rows
