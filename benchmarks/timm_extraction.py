"""`python -m benchmarks.timm_extraction [--model NAME] [--images N]`: extraction of a timm model,
featurecache against the plain timm loop, same images, same precision (fp32), one run each.

The plain loop is what a timm user writes: `create_transform(**resolve_data_config(model=m))`
on PIL images in an ImageFolder, a DataLoader in this process, `forward_features` then
`forward_head(pre_logits=True)` under `inference_mode`, features concatenated in memory.
featurecache runs `extract --model timm:NAME --weights random --precision fp32` on the same
folder (its defaults otherwise: workers, `--optimize auto`, float16 storage written to disk).
Both build the model inside the timed region. Prints images/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .common import HYMENOPTERA


def _folder(workdir: Path, images: int) -> Path:
    """The first `images` / 2 photos of each class of hymenoptera's train split, as an ImageFolder tree."""
    photos = [p for label in ("ants", "bees")
              for p in sorted(HYMENOPTERA.joinpath("train", label).glob("*.jpg"))[: images // 2]]
    for photo in photos:
        target = workdir / "photos" / "train" / photo.parent.name / photo.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(photo, target)
    return workdir / "photos"


def plain_timm(folder: Path, model: str, batch_size: int) -> tuple[int, float]:
    import timm
    import timm.data
    import torchvision

    started = time.perf_counter()
    network = timm.create_model(model, pretrained=False).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=network))
    dataset = torchvision.datasets.ImageFolder(str(folder / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    rows = 0
    with torch.inference_mode():
        for images, _ in loader:
            rows += len(network.forward_head(network.forward_features(images), pre_logits=True))
    return rows, time.perf_counter() - started


def ours(folder: Path, model: str, batch_size: int, root: Path) -> tuple[int, float]:
    from featurecache import extract
    from featurecache.extract.stage import ExtractSpec

    started = time.perf_counter()
    result = extract(ExtractSpec(source=str(folder), model=f"timm:{model}", weights="random", precision="fp32",
                                 batch_size=batch_size, root=str(root)))
    return result.computed, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_atto")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if not HYMENOPTERA.is_dir():
        raise SystemExit(f"needs the photos in {HYMENOPTERA}")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="timm-bench-") as scratch:
        folder = _folder(Path(scratch), args.images)
        plain_rows, plain_s = plain_timm(folder, args.model, args.batch_size)
        our_rows, our_s = ours(folder, args.model, args.batch_size, Path(scratch) / "cache")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model timm:{args.model}, {plain_rows} images, fp32, batch {args.batch_size}")
    print(f"plain timm loop: {plain_rows / plain_s:.1f} img/s ({plain_s:.1f} s)")
    print(f"featurecache extract: {our_rows / our_s:.1f} img/s ({our_s:.1f} s)")
    print(f"ratio featurecache / timm: {(our_rows / our_s) / (plain_rows / plain_s):.2f}x")


if __name__ == "__main__":
    main()
