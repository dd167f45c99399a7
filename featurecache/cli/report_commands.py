"""CLI commands to see the results: report, run (declarative pipelines) and demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app, console, err_console, handle_errors, progress_bar, stop_bar


@app.command("report")
@handle_errors
def report_command(
    cache: Annotated[str, typer.Argument(help="Cache entry (path, folder name or key prefix).")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="HTML file to write, outside the cache (default: <entry>/report/report.html, rewritten each time); PNGs go next to it.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing -o file and its PNGs.")] = False,
    head: Annotated[Optional[str], typer.Option(help="Head to detail (confusion matrix, mistakes); default: the best.")] = None,
    worst: Annotated[int, typer.Option(min=0, help="How many of the most confident mistakes to show.")] = 16,
    max_points: Annotated[int, typer.Option(min=10, help="Images sampled for the 2-D projection.")] = 2000,
    tsne: Annotated[bool, typer.Option(help="Add a t-SNE projection next to the PCA (slower).")] = False,
    root: Annotated[Optional[Path], typer.Option(help="Cache root.")] = None,
) -> None:
    """Write an HTML report (images embedded, readable without JavaScript) plus PNGs.

    Example: featurecache report cache/digits-resnet50-0123456789ab -o report.html
    """
    from ..report.page import ReportSpec, build_report
    from ..cache.store import open_cache

    spec = ReportSpec(output=str(output) if output else None, head=head, worst=worst, max_points=max_points, tsne=tsne,
                      overwrite=overwrite)
    result = build_report(open_cache(cache, root=root), spec)
    console.print(f"report: {result.path}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"  {len(result.figures)} figures: {', '.join(p.name for p in result.figures)}",
                  markup=False, highlight=False, soft_wrap=True)
    for note in result.notes:
        err_console.print(f"warning: {note}", markup=False, highlight=False, soft_wrap=True)
    if result.notes:
        raise typer.Exit(1)


def _run(pipeline, quiet: bool):
    """Run a loaded pipeline, printing one line per step; returns the PipelineResult."""
    from ..pipeline.runner import run_pipeline

    bar, update = progress_bar("extract", quiet)

    def on_step(outcome) -> None:
        stop_bar(bar)
        if not quiet:
            state = "cached" if outcome.cached else f"done in {outcome.seconds:.1f}s"
            console.print(f"{outcome.step:<24} {state:<16} {outcome.summary}", markup=False, highlight=False, soft_wrap=True)

    def on_finetune(event: dict) -> None:
        if event.get("phase") == "val" and not quiet:
            err_console.print(f"  finetune epoch {event['epoch']}/{event['epochs']}: val top-1 "
                              f"{100 * event['val_top1']:.1f}% ({event['seconds']:.0f}s)", markup=False, highlight=False, soft_wrap=True)

    try:
        return run_pipeline(pipeline, on_step=on_step, progress=update, finetune_progress=on_finetune)
    finally:
        stop_bar(bar)


@app.command("run")
@handle_errors
def run_command(
    pipeline_file: Annotated[Path, typer.Argument(metavar="PIPELINE", help="A pipeline TOML file (see pipelines/).")],
    root: Annotated[Optional[Path], typer.Option(help="Cache root (overrides the file's [pipeline] root).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Only validate the file.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the report's path.")] = False,
) -> None:
    """Run extract -> heads -> ensemble -> finetune -> report from one TOML file; cached steps are skipped.

    Example: featurecache run pipelines/digits.toml
    """
    from ..pipeline.runner import load_pipeline

    pipeline = load_pipeline(pipeline_file, root=root)
    if check:
        console.print(f"{pipeline_file}: valid ({len(pipeline.heads)} heads"
                      f"{', an ensemble' if pipeline.ensemble else ''}{', a finetune' if pipeline.finetune else ''})",
                      markup=False, highlight=False, soft_wrap=True)
        return
    result = _run(pipeline, quiet)
    console.print(f"report: {result.report_path}" if not quiet else str(result.report_path), markup=False, highlight=False, soft_wrap=True)


@app.command("demo")
@handle_errors
def demo_command(
    quick: Annotated[bool, typer.Option(help="A small, fast version (32 px, short training) for tests.")] = False,
    root: Annotated[Optional[Path], typer.Option(help="Cache root (default $FEATURECACHE_ROOT or ./cache).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the report's path.")] = False,
) -> None:
    """Run pipelines/digits.toml end to end, offline, and say where the report is.

    Uses ImageNet weights when they are in torch hub's cache; otherwise says so and uses random weights.

    Example: featurecache demo
    """
    from ..pipeline.demo import demo_pipeline

    pipeline, note = demo_pipeline(quick=quick, root=root)
    if not quiet:
        console.print(f"demo: running {pipeline.path}", markup=False, highlight=False, soft_wrap=True)
        console.print(f"demo: {note}", markup=False, highlight=False, soft_wrap=True)
    result = _run(pipeline, quiet)
    if quiet:
        console.print(str(result.report_path.resolve()), markup=False, highlight=False, soft_wrap=True)
        return
    computed = sum(not step.cached for step in result.steps)
    total = sum(step.seconds for step in result.steps)
    console.print(f"{computed} of {len(result.steps)} steps computed in {total:.0f}s "
                  f"({len(result.steps) - computed} cached)", markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {result.report_path.resolve()}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"open it in a browser, e.g. xdg-open {result.report_path.resolve()}", markup=False, highlight=False, soft_wrap=True)
