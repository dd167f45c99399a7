"""2. Where the time goes: decode, resize, forward, write; compute-only throughput."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from featurecache.backbones.registry import IMAGENET_PREPROCESSING, StagedBackbone
from featurecache.device import autocast
from featurecache.data.images import load_rgb
from featurecache.backbones.optimize import optimize_backbone
from featurecache.backbones.preprocess import normalize_batch, prepare_image
from featurecache.cache.shards import ShardRows, ShardWriter

from .common import Config, Row, interleaved
from .extraction import datasets
from .naive import naive_model


def preprocessing(config: Config):
    return IMAGENET_PREPROCESSING.with_image_size(config.image_size) if config.image_size else IMAGENET_PREPROCESSING


def our_forward(config: Config, batch_size: int, mode: str | None = None, precision: str | None = None):
    """Our forward pass (random weights, seeded by the caller): `mode` and `precision`
    default to config's, which are extract's defaults on this CPU."""
    model = StagedBackbone(naive_model(config.model)).eval().to(memory_format=torch.channels_last)
    forward = optimize_backbone(model, ("pool",), mode=mode or config.forward_mode, batch_size=batch_size,
                                image_size=preprocessing(config).crop_size, device=torch.device("cpu"))
    precision = precision or config.precision

    def run(x: torch.Tensor, taps=("pool",)) -> dict[str, torch.Tensor]:
        with autocast(torch.device("cpu"), precision):
            return forward(x, taps)

    return run


def _per_image_ms(function, items, repeats: int) -> float:
    seconds = interleaved({"f": lambda: [function(item) for item in items]}, repeats=repeats, warmup=0)["f"]
    return 1000 * seconds / len(items)


def stage_times(config: Config, files: list[Path], batch: torch.Tensor, forward) -> dict[str, float]:
    """Milliseconds per image for each stage of our pipeline (in one thread, no overlap)."""
    pre = preprocessing(config)
    decoded = [load_rgb(f) for f in files]
    times = {
        "decode": _per_image_ms(load_rgb, files, config.repeats),
        "resize": _per_image_ms(lambda image: prepare_image(image, pre), decoded, config.repeats),
    }
    with torch.inference_mode():
        times["forward"] = _per_image_ms(lambda b: forward(normalize_batch(b, pre), ("pool",)), [batch],
                                         config.repeats) / len(batch)
        features = forward(normalize_batch(batch, pre), ("pool",))["pool"].half().numpy()
    target = config.workdir / "write-test" / "train-00000.h5"
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(_):
        writer = ShardWriter(target, tap_shapes={"pool": features.shape[1:]}, dtype="float16", attrs={},
                             capacity=len(features))
        n = len(features)
        writer.append(ShardRows({"pool": features}, np.zeros(n, np.int64), np.arange(n), [f"x/{i}" for i in range(n)],
                                [f"{i:032d}" for i in range(n)]))
        writer.commit()

    times["write"] = _per_image_ms(write, [None], config.repeats) / len(features)
    return times


def run(config: Config) -> list[Row]:
    rows = []
    pre = preprocessing(config)
    batch_size = 4 if config.tiny else 16
    found = datasets(config)
    forward = our_forward(config, batch_size)  # frozen graphs take any batch size
    for label, folder, _ in [found[0], found[-1]] if len(found) > 1 else found:  # smallest and largest
        files = sorted(p for p in folder.rglob("*") if p.is_file())[:batch_size]
        batch = torch.stack([prepare_image(load_rgb(f), pre) for f in files])
        times = stage_times(config, files, batch, forward)
        total = sum(times.values())
        for stage, ms in times.items():
            rows.append(Row("2", f"{stage} ms/img, {label.split(',')[0]}", ms, unit="ms", higher_is_better=False,
                            note=f"{100 * ms / total:.0f}% of {total:.0f} ms"))
        draft_size = (pre.resize_size, pre.resize_size)
        draft = _per_image_ms(lambda f: load_rgb(f, draft_size=draft_size), files, config.repeats)
        rows.append(Row("2", f"decode with --draft ms/img, {label.split(',')[0]}", draft, times["decode"], "ms",
                        higher_is_better=False, note="vs exact decode"))
    # Compute only: pre-decoded uint8 tensors -> features, ours vs naive NCHW fp32 eager.
    size = pre.crop_size
    uint8 = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    naive = naive_model(config.model)
    with torch.inference_mode():
        seconds = interleaved({
            "naive": lambda: naive(normalize_batch(uint8, pre, channels_last=False)),
            "ours": lambda: forward(normalize_batch(uint8, pre), ("pool",)),
        }, repeats=config.repeats, warmup=1)
    rows.append(Row("2", f"compute only, uint8 {size}px batch {batch_size}", batch_size / seconds["ours"],
                     batch_size / seconds["naive"], "img/s",
                     note=f"{config.forward_mode} {config.precision} channels_last vs NCHW eager fp32"))
    return rows
