"""`featurecache verify`: report every problem of a cache entry; `--repair` fixes them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli import app, console, handle_errors, progress_bar


@app.command()
@handle_errors
def verify(
    cache: Annotated[str, typer.Argument(help="Cache entry path, folder name or key prefix.")],
    repair: Annotated[bool, typer.Option("--repair", help="Drop bad shards and re-extract only their rows.")] = False,
    root: Annotated[Optional[Path], typer.Option(help="Cache root.")] = None,
) -> None:
    """Check every shard of a cache entry (size, SHA-256, shapes, checksums); list each problem.

    Exits 0 when the entry is healthy, 1 when problems remain. h5clear is never run:
    with --repair a damaged shard is recomputed from the images, never patched.

    Example: featurecache verify cache/digits-resnet50-0123456789ab --repair
    """
    from .verify import repair_entry, verify_entry

    if repair:
        bar, update = progress_bar("repair", quiet=False)
        try:
            before, report = repair_entry(cache, root=root, progress=update)
        finally:
            bar.stop()
        for problem in before.problems:
            console.print(f"repaired {problem}", markup=False, highlight=False)
    else:
        report = verify_entry(cache, root=root)
    for problem in report.problems:
        console.print(f"problem {problem}", markup=False, highlight=False)
    state = "ok" if report.ok else f"{len(report.problems)} problem(s); run featurecache verify --repair"
    console.print(f"{report.path}: {report.shards_checked} shards, {report.rows_checked} rows checked; {state}",
                  markup=False, highlight=False)
    if not report.ok:
        raise typer.Exit(1)
