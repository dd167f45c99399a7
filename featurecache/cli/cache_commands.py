"""`extract` and the commands that read the cache without heavy libraries: `ls`, `info`, `sources`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .app import app, console, err_console, handle_errors, progress_bar, stop_bar, Precision, Dtype, Device, OnError, Optimize, Decode, Compression
from ..errors import UsageError


@app.command()
@handle_errors
def extract(
    source: Annotated[str, typer.Argument(help="Image folder, CSV (path,label[,split]), digits, cifar10:ROOT, tinyimagenet:ROOT, food101:ROOT, ... (featurecache sources lists them).")],
    model: Annotated[str, typer.Option(help="Backbone: a torchvision ResNet (resnet18 ... resnet152), timm:NAME (any timm model) or torchvision:NAME (another torchvision classifier).")] = "resnet50",
    weights: Annotated[str, typer.Option(help="imagenet (IMAGENET1K_V1), an enum name like IMAGENET1K_V2, random, or a .pt/.pth/.safetensors file.")] = "imagenet",
    tap: Annotated[list[str], typer.Option("--tap", help="Tap(s) to store: pool (default) or another the model offers (ResNets: layer1..layer4). Repeatable.")] = ["pool"],
    image_size: Annotated[Optional[int], typer.Option(help="Input size override (crop size); part of the cache key.")] = None,
    crop_mode: Annotated[Optional[str], typer.Option(help="Resize/crop rule override (timm's eval modes): center (shorter side resized, centre crop), squash (both sides resized), border (longer side resized, padded with the mean colour); part of the cache key.")] = None,
    dtype: Annotated[Dtype, typer.Option(case_sensitive=False, help="Storage dtype of the features.")] = Dtype.float16,
    precision: Annotated[Precision, typer.Option(case_sensitive=False, help="Forward-pass precision (auto: bf16 on CPU, bf16/fp16 on GPU).")] = Precision.auto,
    device: Annotated[Device, typer.Option(case_sensitive=False)] = Device.auto,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    workers: Annotated[Optional[int], typer.Option(min=0, help="DataLoader workers (default: from the machine).")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Images per shard; the unit of resume.")] = 4096,
    compression: Annotated[Compression, typer.Option(case_sensitive=False)] = Compression.none,
    on_error: Annotated[OnError, typer.Option(case_sensitive=False, help="skip unreadable images (listed in the manifest) or fail.")] = OnError.skip,
    content_hash: Annotated[bool, typer.Option(help="Fingerprint files by content hash instead of size and mtime.")] = False,
    draft: Annotated[bool, typer.Option(help="Decode large JPEGs at reduced size (libjpeg draft mode): faster, slightly different features; part of the cache key.")] = False,
    decode: Annotated[Decode, typer.Option(case_sensitive=False, help="pil: PIL decodes and resizes in the workers; torch: torchvision.io decodes JPEG/PNG and an antialiased tensor resize runs on the extraction device (a whole batch of JPEGs on the GPU at once); numbers differ slightly from PIL's, so it is part of the cache key.")] = Decode.pil,
    optimize: Annotated[Optimize, typer.Option(case_sensitive=False, help="Forward pass: auto (on CPU: freeze in fp32 for 256+ images, else fuse), eager, fuse (BatchNorm folded into the convolutions), freeze (TorchScript, CPU fp32), compile (torch.compile, ~30 s to build).")] = Optimize.auto,
    seed: Annotated[int, typer.Option(help="Seed for --weights random.")] = 0,
    root: Annotated[Optional[Path], typer.Option(help="Cache root (default $FEATURECACHE_ROOT or ./cache).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary; print only the cache path.")] = False,
    devices: Annotated[int, typer.Option(min=1, help="Processes on this machine, one per GPU: N > 1 reruns this command under torchrun (see README, Scaling out).")] = 1,
    name: Annotated[Optional[str], typer.Option(help="Name of the entry's folder (default: the source's name).")] = None,
    unlabeled: Annotated[list[str], typer.Option("--unlabeled", help="A split folder (e.g. test) whose images have no label: cached to predict on, never fitted or scored. Repeatable.")] = [],
    allow_layout: Annotated[bool, typer.Option("--allow-layout", help="Read a folder whose layout looks wrong (a class named images, an empty class, one class, a known dataset's folder) anyway.")] = False,
    views: Annotated[int, typer.Option(help="Augmented views per train image, beside the plain features (a keyed view set; more later computes only the new ones). val/test keep the plain view only.")] = 0,
    augment: Annotated[str, typer.Option(help="Policy of the views: crop-flip (random resized crop, area 0.25-1, and flip), crop, flip, or a crop's area range as crop-flip:0.5-1.")] = "crop-flip",
    view_seed: Annotated[int, typer.Option(help="Seed of the views' crops and flips.")] = 0,
) -> None:
    """Extract backbone features of a dataset into the cache (resumable, incremental).

    Example: featurecache extract ../shared/data/hymenoptera --weights random
    """
    if devices > 1 and "RANK" not in os.environ:
        from ..extract.distributed import launch_command

        raise typer.Exit(subprocess.call(launch_command(sys.argv[1:], devices)))
    from ..extract.stage import ExtractSpec, extract as run_extract

    follower = os.environ.get("RANK", "0") != "0"  # under torchrun, rank 0 alone reports

    spec = ExtractSpec(
        source=source, model=model, weights=weights, taps=tuple(tap), image_size=image_size, crop_mode=crop_mode,
        dtype=dtype.value, precision=precision.value, device=device.value, batch_size=batch_size,
        workers=workers, shard_size=shard_size, compression=None if compression is Compression.none else compression.value,
        on_error=on_error.value, content_hash=content_hash, seed=seed, root=str(root) if root else None,
        draft=draft, optimize=optimize.value, name=name, allow_layout=allow_layout, unlabeled=tuple(unlabeled),
        decode=decode.value, views=views, augment=augment, view_seed=view_seed,
    )
    bar, update = progress_bar("extract", quiet or follower)
    try:
        result = run_extract(spec, progress=update)
    finally:
        stop_bar(bar)
    if follower:
        return
    for warning in result.warnings:
        err_console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    if quiet:
        console.print(str(result.path), markup=False, highlight=False)
        return
    if result.cache_hit:
        console.print(f"cache hit: {result.path} (no backbone work)", markup=False, highlight=False)
    else:
        console.print(f"extracted {result.computed} images in {result.seconds:.1f}s "
                      f"({result.images_per_second:.1f} img/s)", markup=False)
    for note in result.notes:
        console.print(note, markup=False, highlight=False, soft_wrap=True)
    unlabeled_splits = set(result.unlabeled_splits)
    rows = ", ".join(f"{split} {count}" + (" (unlabelled)" if split in unlabeled_splits else "")
                     for split, count in result.splits.items())
    console.print(f"rows: {rows}; skipped: {len(result.skipped)}", markup=False)
    for skip in result.skipped[:10]:
        console.print(f"  skipped {skip['path']}: {skip['reason']}", markup=False, highlight=False)
    if len(result.skipped) > 10:
        console.print(f"  ... and {len(result.skipped) - 10} more (see manifest.json)", markup=False)
    if result.views is not None:
        views = result.views
        console.print(f"views: {views.views} per train image ({views.augment}, view seed {views.seed}); computed "
                      f"{views.computed} in {views.seconds:.1f}s; view set {views.path}", markup=False, highlight=False)
    console.print(f"cache: {result.path}", markup=False, highlight=False)


@app.command("ls")
@handle_errors
def list_entries(
    root: Annotated[Optional[Path], typer.Argument(help="Cache root (default $FEATURECACHE_ROOT or ./cache).")] = None,
) -> None:
    """List cache entries: source, architecture, input size and taps, weights, rows per split, size.

    Example: featurecache ls cache/
    """
    from ..cache.layout import MANIFEST
    from ..cache.summary import entry_rows
    from ..cache.store import default_root

    if root is not None:  # a typo must not read as an empty cache (the default root may not exist yet)
        if (root / MANIFEST).exists():
            raise UsageError(f"{root} is a cache entry, not a cache root; run featurecache info {root}")
        if not root.is_dir():
            what = "is not a folder" if root.exists() or root.is_symlink() else "does not exist"
            raise UsageError(f"cache root {root} {what}; give the folder that holds the entries")
    rows = entry_rows(root or default_root())
    if not rows:
        console.print(f"no cache entries under {root or default_root()}", markup=False)
        return
    table = Table("entry", "source", "model", "weights", "rows", "size", "state")
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command()
@handle_errors
def info(
    cache: Annotated[str, typer.Argument(help="Cache entry path, folder name or key prefix.")],
    root: Annotated[Optional[Path], typer.Option(help="Cache root.")] = None,
) -> None:
    """Show one cache entry's manifest in readable form.

    Example: featurecache info cache/digits-resnet50-0123456789ab
    """
    from ..cache.summary import describe_entry

    for label, value in describe_entry(cache, root):
        console.print(f"{label:>14}: {value}", markup=False, highlight=False)


@app.command("sources")
@handle_errors
def sources_command() -> None:
    """List every kind of dataset extract reads, with the layout each expects.

    Example: featurecache sources
    """
    from ..data.named import describe_sources

    table = Table("source", "layout expected under ROOT (never downloaded)", "splits")
    for row in describe_sources():
        table.add_row(*row)
    console.print(table)
