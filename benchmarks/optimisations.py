"""Optimisations, each measured against the plain path: keep only what pays.

Forward pass (pre-decoded uint8 tensors, batch B): NCHW eager fp32 (the naive loop),
channels_last, bf16 autocast (with BatchNorm folded or not), TorchScript freeze, torch.compile (full run or
`--compile`). Then batch size, JPEG draft decoding (speed and how far the features
move), and DataLoader workers end to end.
"""

from __future__ import annotations

import time

import torch

from featurecache.device import autocast
from featurecache.extract.stage import extract
from featurecache.data.images import load_rgb
from featurecache.backbones.preprocess import normalize_batch, prepare_image

from .breakdown import our_forward, preprocessing
from .common import Config, Row, generated_jpegs, interleaved
from .extraction import ours_spec
from .naive import naive_model


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def forward_variants(config: Config, batch_size: int) -> list[Row]:
    pre = preprocessing(config)
    size = pre.crop_size
    uint8 = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    naive = naive_model(config.model)  # same seed as our_forward's network: same weights
    forwards = {}
    for name, mode, precision in (("channels_last eager fp32", "eager", "fp32"),
                                  ("channels_last bf16 autocast", "eager", "bf16"),
                                  ("fuse (BatchNorm folded) channels_last bf16 autocast", "fuse", "bf16"),
                                  ("freeze (TorchScript) fp32", "freeze", "fp32")):
        if config.tiny and precision == "bf16":  # emulated bf16 is slow enough to dominate the smoke test
            continue
        torch.manual_seed(0)
        forwards[name] = our_forward(config, batch_size, mode=mode, precision=precision)
    candidates = {"NCHW eager fp32 (naive)": lambda: naive(normalize_batch(uint8, pre, channels_last=False))}
    for name, forward in forwards.items():
        candidates[name] = lambda forward=forward: forward(normalize_batch(uint8, pre), ("pool",))["pool"]
    notes = {}
    if config.extra.get("compile"):
        torch.manual_seed(0)
        compiled = our_forward(config, batch_size, mode="compile")
        started = time.perf_counter()
        with torch.inference_mode():
            compiled(normalize_batch(uint8, pre), ("pool",))
        notes["torch.compile (inductor, freezing)"] = f"compile {time.perf_counter() - started:.0f} s; "
        candidates["torch.compile (inductor, freezing)"] = lambda: compiled(normalize_batch(uint8, pre), ("pool",))["pool"]
    with torch.inference_mode():
        reference = candidates["NCHW eager fp32 (naive)"]()
        for name, function in candidates.items():
            notes[name] = notes.get(name, "") + f"features rel. diff {_relative(function(), reference):.1e}"
        seconds = interleaved(candidates, repeats=config.repeats, warmup=1)
    base = seconds["NCHW eager fp32 (naive)"]
    return [Row("O", f"forward {name}, batch {batch_size}", batch_size / s, batch_size / base, "img/s", note=notes[name])
            for name, s in seconds.items()]


def batch_sizes(config: Config) -> list[Row]:
    pre = preprocessing(config)
    candidates = {}
    sizes = (2, 4) if config.tiny else (8, 16, 32, 64)
    for batch_size in sizes:
        uint8 = torch.randint(0, 256, (batch_size, 3, pre.crop_size, pre.crop_size), dtype=torch.uint8)
        forward = our_forward(config, batch_size)
        candidates[batch_size] = lambda forward=forward, uint8=uint8: forward(normalize_batch(uint8, pre), ("pool",))
    with torch.inference_mode():
        seconds = interleaved(candidates, repeats=config.repeats, warmup=1)
    base = sizes[-1]
    return [Row("O", f"forward {config.forward_mode} {config.precision}, batch {b}", b / s, base / seconds[base], "img/s",
                note=f"vs batch {base} (64 is the default)")
            for b, s in seconds.items()]


def draft_decoding(config: Config) -> list[Row]:
    """Decode time and feature change of JPEG draft mode on large JPEGs."""
    pre = preprocessing(config)
    width, height = max(config.generated_sizes, key=lambda s: s[0] * s[1])
    folder = generated_jpegs(config.workdir / "data" / f"draft-{width}x{height}", (width, height), 8, seed=2)
    files = sorted(folder.rglob("*.jpg"))
    draft_size = (pre.resize_size, pre.resize_size)
    exact = torch.stack([prepare_image(load_rgb(f), pre) for f in files])
    drafted = torch.stack([prepare_image(load_rgb(f, draft_size=draft_size), pre) for f in files])
    seconds = interleaved({
        "exact": lambda: [prepare_image(load_rgb(f), pre) for f in files],
        "draft": lambda: [prepare_image(load_rgb(f, draft_size=draft_size), pre) for f in files],
    }, repeats=max(3, config.repeats), warmup=1)
    forward = our_forward(config, len(files))
    with torch.inference_mode():
        a = forward(normalize_batch(exact, pre), ("pool",))["pool"]
        b = forward(normalize_batch(drafted, pre), ("pool",))["pool"]
    cosine = torch.nn.functional.cosine_similarity(a, b).min().item()
    pixels = (exact.float() - drafted.float()).abs().mean().item()
    return [Row("O", f"decode+resize {width}x{height} JPEG, --draft", len(files) / seconds["draft"],
                len(files) / seconds["exact"], "img/s",
                note=f"features rel. diff {_relative(b, a):.1e}, min cosine {cosine:.4f}; mean |pixel diff| {pixels:.2f}/255")]


def workers(config: Config) -> list[Row]:
    """End to end on large JPEGs with 0, 1, 2 DataLoader workers."""
    width, height = max(config.generated_sizes, key=lambda s: s[0] * s[1])
    count = max(4, config.images // 2)
    folder = generated_jpegs(config.workdir / "data" / f"jpeg-{width}x{height}-{count}", (width, height), count)
    candidates = {n: (lambda n=n: extract(ours_spec(config, folder, workers=n))) for n in ((0, 1) if config.tiny else (0, 1, 2))}
    seconds = interleaved(candidates, repeats=config.repeats, warmup=0)
    return [Row("O", f"extract {width}x{height}, workers={n}", count / s, count / seconds[0], "img/s", note="vs 0 workers")
            for n, s in seconds.items()]


def run(config: Config) -> list[Row]:
    batch_size = 4 if config.tiny else 8 if config.quick else 16  # emulated bf16 is slow: keep --quick short
    rows = forward_variants(config, batch_size) + draft_decoding(config)
    if not config.quick or config.tiny:
        rows += batch_sizes(config) + workers(config)
    if torch.cuda.is_available():
        rows += gpu(config)
    else:
        rows.append(Row("O", "GPU (CUDA) paths", None, note="no GPU in this session: figures pending a GPU session"))
    return rows


def gpu(config: Config) -> list[Row]:
    """Compute only on CUDA: fp32 vs bf16/fp16 autocast, channels_last (runs only with a GPU)."""
    pre, batch_size = preprocessing(config), 64
    device = torch.device("cuda")
    uint8 = torch.randint(0, 256, (batch_size, 3, pre.crop_size, pre.crop_size), dtype=torch.uint8, device=device)
    model = our_forward(config, batch_size, mode="eager").to(device)
    precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"

    def run_with(p):
        with autocast(device, p):
            model(normalize_batch(uint8, pre), ("pool",))
        torch.cuda.synchronize()

    with torch.inference_mode():
        seconds = interleaved({"fp32": lambda: run_with("fp32"), precision: lambda: run_with(precision)},
                              repeats=config.repeats, warmup=2)
    return [Row("O", f"GPU forward {torch.cuda.get_device_name(0)} {precision}", batch_size / seconds[precision],
                batch_size / seconds["fp32"], "img/s", note="vs fp32")]
