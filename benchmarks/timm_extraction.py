"""`python -m benchmarks.timm_extraction [--models NAME ...] [--images N]`: extraction of timm models,
featurecache against the plain timm loop, same images, same precision (fp32), one run each.

The plain loop is what a timm user writes: `create_transform(**resolve_data_config(model=m))`
on PIL images in an ImageFolder, a DataLoader in this process, `forward_features` then
`forward_head(pre_logits=True)` under `inference_mode`, features concatenated in memory.
featurecache runs `extract --model timm:NAME --weights random --precision fp32` on the same
folder (its defaults otherwise: workers, `--optimize auto`, float16 storage written to disk).
Both build the model inside the timed region, at the model's native input size. For each
model, prints images/s of each, the ratio and the 1-minute load average after each run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import HYMENOPTERA

#: The issue's four: ResNet50, ViT-S/14 DINOv2 (native 518 px), ConvNeXt-T, EfficientNet-B0.
MODELS = ("resnet50.a1_in1k", "vit_small_patch14_dinov2.lvd142m", "convnext_tiny.fb_in22k", "efficientnet_b0.ra_in1k")


@dataclass(frozen=True)
class Result:
    model: str
    images: int
    input_size: int
    plain_s: float
    ours_s: float
    load: tuple[float, float]  # 1-minute load average after the plain run, after featurecache's

    @property
    def ratio(self) -> float:
        return self.plain_s / self.ours_s  # same images: the ratio of images/s


def photo_folder(workdir: Path, images: int, source: Path = HYMENOPTERA) -> Path:
    """The first `images` / 2 photos of each class of `source`'s train split, as an ImageFolder tree."""
    photos = [p for label in ("ants", "bees")
              for p in sorted(source.joinpath("train", label).glob("*.[jp][pn]g"))[: images // 2]]
    for photo in photos:
        target = workdir / "photos" / "train" / photo.parent.name / photo.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(photo, target)
    return workdir / "photos"


def plain_timm(folder: Path, model: str, batch_size: int, image_size: int | None = None) -> tuple[int, float, int]:
    """(rows, seconds, input size) of the loop a timm user writes."""
    import timm
    import timm.data
    import torchvision

    started = time.perf_counter()
    network = timm.create_model(model, pretrained=False).eval()
    config = timm.data.resolve_data_config({}, model=network)
    if image_size is not None:
        config["input_size"] = (3, image_size, image_size)
    transform = timm.data.create_transform(**config)
    dataset = torchvision.datasets.ImageFolder(str(folder / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    rows = 0
    with torch.inference_mode():
        for images, _ in loader:
            rows += len(network.forward_head(network.forward_features(images), pre_logits=True))
    return rows, time.perf_counter() - started, int(config["input_size"][-1])


def ours(folder: Path, model: str, batch_size: int, root: Path, image_size: int | None = None,
         workers: int | None = None) -> tuple[int, float]:
    from featurecache import extract
    from featurecache.extract.stage import ExtractSpec

    started = time.perf_counter()
    result = extract(ExtractSpec(source=str(folder), model=f"timm:{model}", weights="random", precision="fp32",
                                 batch_size=batch_size, root=str(root), image_size=image_size, workers=workers))
    return result.computed, time.perf_counter() - started


def measure(folder: Path, model: str, batch_size: int, root: Path, *, image_size: int | None = None,
            workers: int | None = None) -> Result:
    torch.manual_seed(0)
    plain_rows, plain_s, size = plain_timm(folder, model, batch_size, image_size)
    after_plain = os.getloadavg()[0]
    our_rows, our_s = ours(folder, model, batch_size, root, image_size, workers)
    if our_rows != plain_rows:
        raise RuntimeError(f"{model}: featurecache computed {our_rows} rows, the plain loop {plain_rows}")
    return Result(model, plain_rows, size, plain_s, our_s, (after_plain, os.getloadavg()[0]))


def table(results: list[Result]) -> str:
    lines = ["| model | input | images | plain timm img/s | featurecache img/s | ratio | load (1 min) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.model} | {r.input_size} px | {r.images} | {r.images / r.plain_s:.2f} "
                     f"| {r.images / r.ours_s:.2f} | **{r.ratio:.2f}x** | {r.load[0]:.1f}, {r.load[1]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if not HYMENOPTERA.is_dir():
        raise SystemExit(f"needs the photos in {HYMENOPTERA}")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"load before {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="timm-bench-") as scratch:
        folder = photo_folder(Path(scratch), args.images)
        for model in args.models:
            results.append(measure(folder, model, args.batch_size, Path(scratch) / "cache"))
            r = results[-1]
            print(f"{model}: plain {r.plain_s:.1f} s, featurecache {r.ours_s:.1f} s, ratio {r.ratio:.2f}x", flush=True)
    print(f"fp32, batch {args.batch_size}, random weights")
    print(table(results))


if __name__ == "__main__":
    main()
