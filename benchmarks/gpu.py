"""`python -m benchmarks --gpu`: the GPU check anyone can run, in under 5 minutes on one GPU.

1. Correctness: features of the same generated JPEGs extracted on the GPU against the
   CPU in fp32 (relative L2 difference per image at most 1e-3), and with the GPU's
   default autocast (bf16, or fp16 where bf16 is missing; at most 3e-2).
2. End to end at 224 px on generated 500x375 JPEGs: `extract` with PIL decoding in
   workers against `--decode torch` (nvJPEG, a batch at a time, resize on the GPU), and
   the naive loop (torchvision transforms, fp32, on the GPU).
3. Compute only: uint8 batches already on the GPU -> features (our forward, autocast).
4. The logistic sweep on the GPU (12 Cs, 50,000 x 2048, 10 classes) against one
   scikit-learn `LogisticRegression()` fit on the CPU, with test accuracy.

One table at the end. On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

FEATURE_TOLERANCE = {"fp32": 1e-3, "autocast": 3e-2}  # relative L2 difference, per image, worst image
NO_GPU = "no GPU: CUDA is not available on this machine, so the GPU check has nothing to measure (exit 0)"


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _max_relative(a, b) -> float:
    import numpy as np

    a, b = a.astype(np.float32), b.astype(np.float32)
    return float((np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)).max())


def run(workdir: Path, *, images: int = 512, quick: bool = False, device: str = "cuda", check_images: int = 32,
        logistic_rows: int | None = None) -> list:
    """The rows of the table. `device`, `check_images` and `logistic_rows` exist so that
    the script itself can be dry-run on a CPU with small sizes."""
    import torch

    from featurecache import extract, open_cache
    from featurecache.backbones.registry import IMAGENET_PREPROCESSING, StagedBackbone
    from featurecache.device import autocast, resolve_precision
    from featurecache.extract.stage import ExtractSpec
    from featurecache.backbones.preprocess import normalize_batch

    from .common import Row, generated_jpegs
    from .logistic import compare, synthetic
    from .naive import naive_model

    rows: list[Row] = []
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    precision = resolve_precision("auto", device)
    checks = generated_jpegs(workdir / "check", (500, 375), check_images)
    spec = dict(source=str(checks), model="resnet50", weights="random", dtype="float32", batch_size=16)

    def features(**overrides):
        result = extract(ExtractSpec(**{**spec, **overrides, "root": str(workdir / f"c{time.monotonic_ns()}")}))
        return open_cache(result.path).features("train")

    cpu = features(device="cpu", precision="fp32", workers=2)
    for name, options, tolerance in (("fp32", {"precision": "fp32"}, FEATURE_TOLERANCE["fp32"]),
                                     (f"autocast ({precision})", {}, FEATURE_TOLERANCE["autocast"]),
                                     ("fp32, --decode torch", {"precision": "fp32", "decode": "torch"}, 2e-2)):
        gap = _max_relative(cpu, features(device=device.type, **options))
        rows.append(Row("G", f"features GPU {name} vs CPU fp32: worst relative L2", gap, unit="",
                        higher_is_better=False, target=f"<= {tolerance:g}",
                        note="ok" if gap <= tolerance else "FAILED"))

    folder = generated_jpegs(workdir / "e2e", (500, 375), images)
    timings = {}
    for name, options in (("pil", {}), ("torch", {"decode": "torch"})):
        extract(ExtractSpec(**{**spec, "source": str(folder), "dtype": "float16", "batch_size": 128, **options,
                               "root": str(workdir / "warm")}))  # warm: cuDNN autotuning, page cache
        started = time.perf_counter()
        extract(ExtractSpec(**{**spec, "source": str(folder), "dtype": "float16", "batch_size": 128, **options,
                               "root": str(workdir / f"e2e-{name}")}))
        timings[name] = images / (time.perf_counter() - started)
    started = time.perf_counter()
    _naive_on_gpu(folder, naive_model, device)
    naive_rate = images / (time.perf_counter() - started)
    rows.append(Row("G", f"extract {images} JPEGs 500x375 at 224 px, PIL decode in workers", timings["pil"],
                    naive_rate, "img/s", note="baseline: the naive loop on the GPU"))
    rows.append(Row("G", "same, --decode torch (nvJPEG batched, resize on the GPU)", timings["torch"],
                    timings["pil"], "img/s", note="baseline: PIL decode"))

    model = StagedBackbone(naive_model("resnet50")).eval().to(device, memory_format=torch.channels_last)
    batch = torch.randint(0, 256, (256 if device.type == "cuda" else 4, 3, 224, 224), dtype=torch.uint8,
                          device=device)
    with torch.inference_mode():
        def ours():
            with autocast(device, precision):
                model(normalize_batch(batch, IMAGENET_PREPROCESSING), ("pool",))

        naive = naive_model("resnet50").to(device)
        rates = {}
        for name, step in (("ours", ours),
                           ("naive", lambda: naive(normalize_batch(batch, IMAGENET_PREPROCESSING, channels_last=False)))):
            step()
            sync()
            started = time.perf_counter()
            for _ in range(5):
                step()
            sync()
            rates[name] = 5 * len(batch) / (time.perf_counter() - started)
    rows.append(Row("G", f"compute only, uint8 batch {len(batch)} on the GPU, {precision} channels_last", rates["ours"],
                    rates["naive"], "img/s", note="baseline: NCHW fp32"))

    count = logistic_rows or (10_000 if quick else 50_000)
    result = compare(*synthetic(count, 2048, 10), device=device.type)
    rows.append(Row("G", f"logistic sweep on the GPU (12 Cs), {count} x 2048, 10 classes", result["sweep_seconds"],
                    result["sklearn_seconds"], "s", higher_is_better=False,
                    note=f"test top-1 {100 * result['ours_top1']:.1f}% vs sklearn (CPU) "
                         f"{100 * result['sklearn_top1']:.1f}%; C={result['C']:.3g}"))
    return rows


def _naive_on_gpu(folder: Path, naive_model, device) -> None:
    """The naive loop, with its model and batches on the GPU (what a user would write)."""
    import torch
    import torchvision

    from .naive import naive_transform

    dataset = torchvision.datasets.ImageFolder(str(folder), transform=naive_transform(None))
    loader = torch.utils.data.DataLoader(dataset, batch_size=100, num_workers=0)
    network = naive_model("resnet50").to(device)
    with torch.no_grad():
        for images, _ in loader:
            network(images.to(device)).cpu()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks --gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="128 images, 10,000 logistic rows")
    parser.add_argument("--images", type=int, default=None)
    args, _ = parser.parse_known_args(argv)
    if not gpu_available():
        print(NO_GPU)
        return 0
    import torch

    from .common import format_table, machine

    print(f"machine: {machine()}; GPU: {torch.cuda.get_device_name(0)}", flush=True)
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="featurecache-gpu-") as scratch:
        rows = run(Path(scratch), images=args.images or (128 if args.quick else 512), quick=args.quick)
    print(format_table(rows))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 1 if any(row.note == "FAILED" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
