"""`featurecache verify`: report every problem of a cache entry; `--repair` fixes them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app, console, err_console, handle_errors, progress_bar, stop_bar


@app.command()
@handle_errors
def verify(
    cache: Annotated[str, typer.Argument(help="Cache entry path, folder name or key prefix.")],
    repair: Annotated[bool, typer.Option("--repair", help="Drop bad shards and re-extract only their rows.")] = False,
    root: Annotated[Optional[Path], typer.Option(help="Cache root.")] = None,
) -> None:
    """Check every shard, the backbone checkpoint, heads and finetune outputs of a cache entry.

    Lists each problem. Exits 0 when the entry is healthy, 1 when problems remain or a
    finetune run is unfinished (a warning gives the command that finishes it; --repair
    cannot), 2 when a record (manifest, head) is malformed. h5clear is never run: with
    --repair a damaged shard is recomputed from the images, never patched, and a damaged
    checkpoint is rewritten from the source weights.

    Example: featurecache verify cache/digits-resnet50-0123456789ab --repair
    """
    from ..maintain.verify import repair_entry, verify_entry

    if repair:
        bar, update = progress_bar("repair", quiet=False)
        try:
            before, report = repair_entry(cache, root=root, progress=update)
        finally:
            stop_bar(bar)
        for problem in (p for p in before.problems if p not in report.problems):
            console.print(f"repaired {problem}", markup=False, highlight=False, soft_wrap=True)
    else:
        report = verify_entry(cache, root=root)
    for problem in report.problems:
        console.print(f"problem {problem}", markup=False, highlight=False, soft_wrap=True)
    if report.invalid_records:  # a hand-edited or damaged record: bad input, one error line, exit code 2
        err_console.print(f"error: {' '.join(report.invalid_records[0].split())}", markup=False, highlight=False,
                          soft_wrap=True)
        raise typer.Exit(2)
    for warning in report.unfinished_runs:  # not damage, but not usable as a finished run is: exit 1, as predict
        err_console.print(f"warning: {' '.join(warning.split())}", markup=False, highlight=False, soft_wrap=True)
    unfinished = f"{len(report.unfinished_runs)} finetune run(s) unfinished (rerun the finetune command)"
    if report.ok:
        state = f"no damage, but {unfinished}" if report.unfinished_runs else "ok"
    elif not report.manifest_readable:  # nothing records what to recompute: --repair cannot help
        state = f"the manifest cannot be read; delete {report.path} and run featurecache extract again"
    else:
        state = f"{len(report.problems)} problem(s); run featurecache verify --repair"
        state += f"; {unfinished}" if report.unfinished_runs else ""
    console.print(f"{report.path}: {report.shards_checked} shards, {report.rows_checked} rows, "
                  f"{report.artifacts_checked} other artifacts checked; {state}", markup=False, highlight=False,
                  soft_wrap=True)
    if not report.ok or report.unfinished_runs:
        raise typer.Exit(1)
