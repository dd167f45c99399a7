"""Shared pieces: the config, table rows, interleaved timing, and benchmark data."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featurecache.device import resolve_precision
from featurecache.backbones.optimize import resolve_optimize

HYMENOPTERA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hymenoptera"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif")


@dataclass
class Config:
    """What every benchmark module reads; `quick` and `tiny` shrink the work."""

    workdir: Path  # scratch space (a temporary folder)
    quick: bool = False
    tiny: bool = False  # the smoke test: resnet18, 32 px, a few images, one repeat
    model: str = "resnet50"
    image_size: int | None = None  # None: the weights' own (224)
    repeats: int = 5  # timed runs per candidate (the median is reported)
    images: int = 128  # images per end-to-end run
    hymenoptera: Path | None = HYMENOPTERA
    generated_sizes: tuple[tuple[int, int], ...] = ((96, 96), (500, 375), (1600, 1200))
    read_rows: int = 100_000  # rows of 2048 features in the read benchmark
    scaling_images: int = 64  # 1x of the scaling benchmark
    scaling_factors: tuple[int, ...] = (1, 2, 4)
    forward_mode: str = ""  # how breakdown/optimisations build our forward pass; "" = extract's CPU default
    precision: str = ""  # our forward's precision; "" = extract's CPU default (bf16 with native support)
    in_process: bool = False  # run child scripts in this process (see run_child); set by `tiny`
    extra: dict = field(default_factory=dict)

    @classmethod
    def make(cls, workdir: Path, *, quick: bool = False, tiny: bool = False, **overrides) -> "Config":
        config = cls(workdir=workdir, quick=quick, tiny=tiny)
        if quick:
            config.repeats, config.images, config.read_rows, config.scaling_images = 3, 32, 30_000, 16
            config.generated_sizes = ((96, 96), (1600, 1200))
        if tiny:
            config.model, config.image_size, config.repeats, config.images = "resnet18", 32, 1, 4
            config.read_rows, config.scaling_images, config.hymenoptera = 64, 2, None
            config.scaling_factors = (1,)
            config.forward_mode = "eager"  # tracing costs seconds; optimisations still exercises freeze
            config.in_process = True  # a child's interpreter and imports cost 4-5 s; its figures go unread
            config.generated_sizes = ((48, 40), (200, 150))
        for key, value in overrides.items():
            setattr(config, key, value)
        if config.hymenoptera is not None and not config.hymenoptera.is_dir():
            config.hymenoptera = None
        config.precision = config.precision or resolve_precision("auto", torch.device("cpu"))
        config.forward_mode = config.forward_mode or resolve_optimize("auto", torch.device("cpu"), config.precision)
        return config


@dataclass
class Row:
    """One line of the table: a measurement, our figure, the baseline's, their ratio."""

    section: str
    name: str
    ours: float | None
    baseline: float | None = None
    unit: str = ""
    higher_is_better: bool = True
    target: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.baseline is None or not self.ours or not self.baseline:
            return None
        return self.ours / self.baseline if self.higher_is_better else self.baseline / self.ours


def format_table(rows: list[Row]) -> str:
    header = ("#", "measurement", "ours", "baseline", "ratio", "target", "note")
    lines = [header]
    for row in rows:
        lines.append((row.section, row.name, _number(row.ours, row.unit), _number(row.baseline, row.unit),
                      "" if row.ratio is None else f"{row.ratio:.2f}x", row.target, row.note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(out)


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    text = f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per candidate, run A B A B ... after `warmup` untimed rounds."""
    for _ in range(warmup):
        for run in candidates.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(max(1, repeats)):
        for name, run in candidates.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def run_child(script: str, argument: str, *, in_process: bool = False, what: str = "child") -> dict:
    """Run `python -c SCRIPT ARGUMENT` in a fresh process; the JSON its last line of output prints.

    A fresh process is what makes a child's memory figures its own. `in_process` (the
    smoke test) runs the same script in this process instead: the same code end to end,
    without the interpreter's and imports' start-up, and with figures that mean nothing."""
    if in_process:
        output, argv = io.StringIO(), sys.argv
        sys.argv = ["-c", argument]
        try:
            with contextlib.redirect_stdout(output):
                exec(compile(script, f"<{what}>", "exec"), {"__name__": "__main__"})
        finally:
            sys.argv = argv
        text = output.getvalue()
    else:
        done = subprocess.run([sys.executable, "-c", script, argument], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{what} failed: {done.stderr[-2000:]}")
        text = done.stdout
    return json.loads(text.strip().splitlines()[-1])


def machine() -> str:
    import torch

    flags = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in cpuinfo)
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{model} ({flags}), {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}")


def subset_folder(source: Path, destination: Path, count: int) -> Path:
    """An ImageFolder of symlinks to the first `count` images (spread over the classes)."""
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    step = max(1, len(files) // max(1, count))
    chosen = files[::step][:count]
    for file in chosen:
        link = destination / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(file)
    return destination


def generated_jpegs(destination: Path, size: tuple[int, int], count: int, seed: int = 0) -> Path:
    """`count` photo-like JPEGs (smooth gradients, shapes, mild noise) in two classes.

    Pure noise would make unrealistic JPEGs (huge, slow to decode); these compress like
    photographs, about 1-2 bits per pixel at quality 90.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        path = destination / ("a" if i % 2 == 0 else "b") / f"img{i:05d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        phase = rng.uniform(0, 6.28, 3)
        frequency = rng.uniform(1, 6, 3) / max(width, height)
        channels = [127 + 100 * np.sin(xs * frequency[c] * 6.28 + phase[c]) * np.cos(ys * frequency[(c + 1) % 3] * 6.28)
                    for c in range(3)]
        pixels = np.stack(channels, axis=-1)
        for _ in range(6):  # a few solid discs for edges
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(size)
            mask = (xs - cx) ** 2 + (ys - cy) ** 2 < r * r
            pixels[mask] = rng.uniform(0, 255, 3)
        pixels += rng.normal(0, 6, pixels.shape)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return destination


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
