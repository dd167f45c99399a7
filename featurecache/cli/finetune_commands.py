"""`featurecache finetune`: unfreeze the last blocks of the cache's backbone, starting from a head."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .app import Device, Precision, app, console, err_console, handle_errors, stop_bar


@app.command("finetune")
@handle_errors
def finetune_command(
    cache: Annotated[str, typer.Argument(help="Cache entry (path, folder name or key prefix).")],
    head: Annotated[Optional[str], typer.Option(help="Starting head (logistic or mlp); default: the cache's best logistic head.")] = None,
    unfreeze: Annotated[Optional[str], typer.Option(help="The blocks to train: a last stage (ResNets: layer4; timm ConvNeXt: stages.3), STAGE+ (that stage and all after, e.g. layer3+), or N: the last N blocks. Default: the backbone's last stage for ResNets (layer4), its last block for others.")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 5,
    lr: Annotated[float, typer.Option(help="Learning rate of the head (AdamW, cosine decay).")] = 3e-4,
    backbone_lr: Annotated[float, typer.Option(help="Learning rate of the unfrozen blocks (lower than the head's).")] = 3e-5,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (weights only, not biases or BatchNorm).")] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=2)] = 32,
    from_cache: Annotated[bool, typer.Option("--from-cache", help="Fast path: train from the cached activations at the input of the unfrozen blocks (tap layer3 for --unfreeze layer4). No image decoding and no forward pass through the frozen part, but NO image augmentation: the activations were computed once, from centre crops.")] = False,
    augment: Annotated[bool, typer.Option(help="Random resized crop (and flip) at the cache's input size; image path only.")] = True,
    crop_min: Annotated[float, typer.Option(min=0.01, max=1.0, help="Smallest area fraction of the random resized crop.")] = 0.25,
    hflip: Annotated[bool, typer.Option(help="Random horizontal flip in the augmentation (turn off for digits, text).")] = True,
    train_bn: Annotated[bool, typer.Option(help="Update the BatchNorm statistics of the unfrozen blocks (default: keep them).")] = False,
    name: Annotated[Optional[str], typer.Option(help="Output folder under finetune/ (default: <head>-<unfreeze>).")] = None,
    device: Annotated[Device, typer.Option(case_sensitive=False)] = Device.auto,
    precision: Annotated[Precision, typer.Option(case_sensitive=False, help="auto: bf16/fp16 autocast on GPU; bf16 on CPUs with native support, else fp32.")] = Precision.auto,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Image-decoding workers (default: from the machine).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of shuffling and augmentation.")] = 0,
    restart: Annotated[bool, typer.Option("--restart", help="Start over instead of resuming an interrupted run.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run of the same name (as --restart).")] = False,
    root: Annotated[Optional[Path], typer.Option(help="Cache root.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Fine-tune the last blocks from the cache's checkpoint and a fitted head (LP-FT); resumable.

    Writes finetune/<name>/ in the cache entry: backbone.safetensors (usable with
    extract --weights), head.safetensors and finetune.json (provenance and per-epoch
    metrics). The best validation epoch is kept; epoch 0 is the starting head itself.
    --from-cache cannot use image augmentation; it needs the tap at the input of the
    unfrozen blocks (extract --tap layer3 for --unfreeze layer4). A run stopped early is
    unfinished: the same command resumes it (other settings are refused, naming them);
    export refuses it, predict uses its best epoch so far with a warning.

    Example: featurecache finetune cache/digits-resnet18-0123456789ab --unfreeze layer4 --epochs 3 --no-hflip
    """
    from ..finetune.stage import FinetuneSpec, finetune
    from ..cache.store import open_cache

    spec = FinetuneSpec(head=head, unfreeze=unfreeze, epochs=epochs, lr=lr, backbone_lr=backbone_lr,
                        weight_decay=weight_decay, batch_size=batch_size, from_cache=from_cache, augment=augment,
                        crop_scale=(crop_min, 1.0),
                        hflip=hflip, train_bn=train_bn, name=name, device=device.value, precision=precision.value,
                        workers=workers, seed=seed, restart=restart or overwrite)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=err_console,
                        disable=quiet, auto_refresh=False)
    tasks: dict[int, int] = {}

    def update(event: dict) -> None:
        if event["phase"] == "val":
            progress.console.print(f"epoch {event['epoch']}/{event['epochs']}: train loss {event['train_loss']:.4f} "
                                   f"top-1 {event['train_top1']:.2%}, val top-1 {event['val_top1']:.2%} "
                                   f"({event['seconds']:.1f}s)", markup=False, highlight=False)
            return
        if event["epoch"] not in tasks:
            if not progress.live.is_started:
                progress.start()
            tasks[event["epoch"]] = progress.add_task(f"epoch {event['epoch']}/{epochs}", total=event["total"], stats="")
        progress.update(tasks[event["epoch"]], completed=event["done"],
                        stats=f"loss {event['loss']:.4f} acc {event['top1']:.2%}")
        progress.refresh()

    try:
        result = finetune(open_cache(cache, root=root), spec, progress=update)
    finally:
        stop_bar(progress)
    record = result.record
    start, best = record["history"][0]["val_top1"], result.best
    if result.resumed_from:
        console.print(f"resumed after epoch {result.resumed_from}", markup=False)
    console.print(f"val top-1: starting head {record['starting_head']} {start:.2%} -> best epoch "
                  f"{record['best_epoch']} {best['val_top1']:.2%}", markup=False, highlight=False)
    if "test_metrics" in record:
        before = record["starting_head_metrics"].get("test", {}).get("top1")
        console.print(f"test top-1: {before:.2%} -> {record['test_metrics']['top1']:.2%}" if before is not None
                      else f"test top-1: {record['test_metrics']['top1']:.2%}", markup=False, highlight=False)
    console.print(f"finetune: {result.path}", markup=False, highlight=False)
