"""Finetune: seconds per epoch of the fast path (cached layer3) versus the image path.

Same cache, same rows, same starting head, `--unfreeze layer4`, one epoch each (a
training pass plus a validation pass), each path in its own child process so that its
peak resident memory is its own (reported as the rise of the peak over the RSS before
`finetune()` is called, so torch's start-up is not counted). The image path runs as it would by
default (random resized crop, decoding in DataLoader workers); the fast path cannot
augment. Target: the fast path is at least 3x faster on CPU.

    python -m benchmarks.finetune [--model resnet50] [--image-size 224] [--images 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .common import Config, Row

_CHILD = r"""
import json, resource, sys
from featurecache import open_cache
from featurecache.finetune.stage import FinetuneSpec, finetune

def status(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith(key))

cache = open_cache(sys.argv[1])
try:  # reset the peak to the current RSS (Linux >= 4.0): imports and torch's start-up do not count
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    start = status("VmRSS:")
except OSError:
    start = 0.0
result = finetune(cache, FinetuneSpec(epochs=int(sys.argv[3]), from_cache=sys.argv[2] == "fast", hflip=False,
                                      precision="auto", name="bench-" + sys.argv[2], restart=True))
epochs = result.record["history"][1:]
try:
    peak = status("VmHWM:")
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": sorted(h["seconds"] for h in epochs)[len(epochs) // 2], "peak_mb": peak - start,
                  "val_top1": [h["val_top1"] for h in result.record["history"]]}))
"""

def digits_folder(root: Path, images: int) -> Path:
    """The first `images` digits as PNGs, three quarters train and one quarter val."""
    from sklearn.datasets import load_digits

    data = load_digits()
    cut = images * 3 // 4
    for index in range(images):
        split = "train" if index < cut else "val"
        path = root / "digits" / split / str(data.target[index]) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((data.images[index] * 255 / 16).astype(np.uint8)).save(path)
    return root / "digits"


def prepare(workdir: Path, *, model: str, image_size: int | None, images: int) -> Path:
    """A cache with taps pool + layer3 and a logistic head; returns the entry's path."""
    from featurecache import ExtractSpec, extract, open_cache
    from featurecache.fit.stage import FitSpec, fit_head

    source = digits_folder(workdir, images)
    result = extract(ExtractSpec(source=str(source), model=model, weights="random", image_size=image_size,
                                 taps=("pool", "layer3"), root=str(workdir / "cache")))
    fit_head(open_cache(result.path), FitSpec(head="logistic", overwrite=True))
    return result.path


def measure(entry: Path, path: str, epochs: int = 1) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(entry), path, str(epochs)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(config: Config) -> list[Row]:
    model = config.extra.get("finetune_model", config.model)
    images = 16 if config.tiny else config.extra.get("finetune_images", 128)
    entry = prepare(config.workdir / "finetune", model=model, image_size=config.image_size, images=images)
    image, fast = measure(entry, "image"), measure(entry, "fast")
    size = config.image_size or 224
    return [
        Row("ft", f"finetune layer4 s/epoch, {model} {size}px, {images} imgs: cached layer3 vs images",
            fast["seconds"], image["seconds"], unit="s", higher_is_better=False, target=">= 3x"),
        Row("ft", "finetune peak memory rise: cached layer3 vs images", fast["peak_mb"], image["peak_mb"], unit="MB",
            higher_is_better=False, note="peak RSS over the RSS before finetune(), each path in its own process"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        entry = prepare(Path(tmp), model=args.model, image_size=args.image_size, images=args.images)
        results = {path: measure(entry, path, args.epochs) for path in ("image", "fast")}
    for path, figures in results.items():
        print(f"{path:>5} path: {figures['seconds']:.2f} s/epoch, peak RSS rise {figures['peak_mb']:.0f} MB, "
              f"val top-1 by epoch {figures['val_top1']}")
    print(f"fast path speed-up: {results['image']['seconds'] / results['fast']['seconds']:.2f}x "
          f"(target: at least 3x on CPU)")


if __name__ == "__main__":
    main()
