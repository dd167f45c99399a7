"""`featurecache compare`: several backbones over one dataset, the same heads on each, one table and report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .app import CompareWeights, Device, Precision, app, console, err_console, handle_errors, progress_bar, stop_bar


@app.command("compare")
@handle_errors
def compare_command(
    source: Annotated[str, typer.Argument(help="Image folder, CSV, digits, cifar10:ROOT, ... (as for extract).")],
    model: Annotated[list[str], typer.Option("--model", help="A backbone, as extract's --model (resnet50, timm:NAME, torchvision:NAME); at least two, repeatable.")] = [],
    head: Annotated[list[str], typer.Option("--head", help="A head fitted on every backbone: logistic, mlp, knn or sklearn:<module>.<Estimator>; repeatable (default: logistic).")] = [],
    weights: Annotated[CompareWeights, typer.Option(case_sensitive=False, help="pretrained (each model's default weights, as extract's --weights pretrained) or random (seeded; accuracies then say nothing about the backbones).")] = CompareWeights.pretrained,
    image_size: Annotated[Optional[int], typer.Option(help="Input size for every backbone (default: each model's own).")] = None,
    tap: Annotated[str, typer.Option(help="The tap every backbone offers: pool.")] = "pool",
    precision: Annotated[Precision, typer.Option(case_sensitive=False, help="Forward-pass precision.")] = Precision.auto,
    device: Annotated[Device, typer.Option(case_sensitive=False)] = Device.auto,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    workers: Annotated[Optional[int], typer.Option(min=0, help="DataLoader workers (default: from the machine).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Choose each head's settings on this fraction of train (the val split is then held out); default: on the val split.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of --weights random and of the heads.")] = 0,
    root: Annotated[Optional[Path], typer.Option(help="Cache root (default $FEATURECACHE_ROOT or ./cache).")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="The HTML report; its plot goes next to it as a PNG.")] = Path("compare.html"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing -o file and its PNG.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Extract each backbone (reusing cached entries), fit the same heads on each, compare accuracy and cost.

    Example: featurecache compare photos/ --model resnet18 --model timm:convnext_atto --head logistic --head knn --weights random
    """
    from ..pipeline.compare import compare_backbones
    from ..report.comparison import build_comparison_page, check_output

    check_output(output, overwrite=overwrite)  # a bad -o is refused before the extractions, not after them
    bars = []

    def stop_last_bar() -> None:
        if bars:
            stop_bar(bars[-1][0])

    def on_backbone(name: str, number: int, total: int) -> None:
        stop_last_bar()
        if not quiet:
            err_console.print(f"[{number}/{total}] {name}", markup=False, highlight=False)
        bars.append(progress_bar("extract", quiet))

    try:
        comparison = compare_backbones(
            source, model, tuple(head) or ("logistic",), weights=weights.value, tap=tap, image_size=image_size,
            precision=precision.value, device=device.value, root=root, val_fraction=val_fraction, seed=seed,
            batch_size=batch_size, workers=workers, on_backbone=on_backbone,
            progress=lambda done, total: bars[-1][1](done, total))
    finally:
        stop_last_bar()
    for columns, rows in ((comparison.BACKBONE_COLUMNS, comparison.backbone_rows()),
                          (comparison.HEAD_COLUMNS, comparison.head_rows())):
        table = Table(*columns)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if any(run.reused for run in comparison.backbones):
        console.print("reused: the cache entry was complete, so nothing was computed and no extraction time is "
                      "recorded for it", markup=False, highlight=False, soft_wrap=True)
    if comparison.random_weights:
        console.print("random weights: these accuracies say nothing about the backbones' real quality",
                      markup=False, highlight=False)
    page = build_comparison_page(comparison, output, overwrite=overwrite)
    console.print(f"report: {page.path}", markup=False, highlight=False, soft_wrap=True)
    for model_name, score in comparison.failures:
        err_console.print(f"error: head {score.name} failed on {model_name}: {score.error}", markup=False,
                          highlight=False, soft_wrap=True)
    if comparison.failures:
        raise typer.Exit(1)
