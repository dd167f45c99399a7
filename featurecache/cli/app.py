"""The `featurecache` command: parse options, call the library, render, map errors.

No torch logic lives here. Every expected failure is a FeatureCacheError and becomes
one line `error: ...` on stderr with exit code 2 (bad input) or 1 (run-time failure);
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import logging
import sys
from enum import Enum
from typing import Annotated

import typer
from rich.console import Console
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import __version__
from ..errors import FeatureCacheError
from ..options import COMPARE_WEIGHTS, COMPRESSIONS, DECODES, DEVICES, DTYPES, ON_ERROR, OPTIMIZE, PRECISIONS

# Heavy libraries (torch, torchvision, scikit-learn, matplotlib, h5py) load inside the
# commands that use them, never at module level here or in the cli_* modules: --help,
# --version, ls, info, heads and argument errors answer at once (tests/test_startup.py).

class _OneLineErrors(typer.core.TyperGroup):
    """Click's own errors (a bad value, a missing argument) as one `error:` line, exit 2.

    Click prints a usage block, a hint and `Error: ...` over several lines; the CLI promises
    one line for every bad input, whichever layer notices it.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as error:  # bare `featurecache`: the help, as click shows it
            error.show()
            sys.exit(error.exit_code)
        except ClickException as error:
            message = " ".join(error.format_message().split())
            if isinstance(error, UsageError) and error.ctx is not None:
                message += f" (see: {error.ctx.command_path} --help)"
            typer.echo(f"error: {message}", err=True)
            sys.exit(error.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)  # non-standalone click returns Exit's code


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Run a frozen backbone over images once; fit many heads on the cached features.")
# No markup or highlighting anywhere: class names, paths and tap labels are data, and text like
# "[/b]" or " [layer3]" in them crashed a table or vanished from it.
console = Console(markup=False, highlight=False)
err_console = Console(stderr=True, markup=False, highlight=False)
_state = {"debug": False}


def _choices(name: str, vocabulary: tuple[str, ...]) -> type[Enum]:
    """A CLI choice type built from the library's vocabulary (featurecache/options.py)."""
    return Enum(name, {value: value for value in vocabulary}, type=str)


Precision = _choices("Precision", PRECISIONS)
Dtype = _choices("Dtype", DTYPES)
Device = _choices("Device", DEVICES)
OnError = _choices("OnError", ON_ERROR)
Optimize = _choices("Optimize", OPTIMIZE)
Decode = _choices("Decode", DECODES)
Compression = _choices("Compression", COMPRESSIONS)
CompareWeights = _choices("CompareWeights", COMPARE_WEIGHTS)


def _version(value: bool) -> None:
    if value:
        console.print(f"featurecache {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_WarningsSaySo())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


class _WarningsSaySo(logging.Formatter):
    """The library's warnings print as `warning: ...`, like the CLI's own; info lines as they are."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"warning: {text}" if record.levelno >= logging.WARNING else text


def handle_errors(function):
    """Turn library errors into `error: ...` and an exit code, in one place."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except FeatureCacheError as error:
            if _state["debug"]:
                raise
            message = " ".join(str(error).split())  # one line, whatever the cause's text held
            err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("error: interrupted; rerun the same command to resume", markup=False)
            raise typer.Exit(130) from None
        except OSError as error:  # an unwritable folder or a failing disk the library did not expect
            if _state["debug"]:
                raise
            from ..cache.atomic import os_error_text

            err_console.print(f"error: {os_error_text(error)}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except MemoryError:
            if _state["debug"]:
                raise
            err_console.print("error: out of memory; use a smaller --batch-size or --max-memory, or a machine with "
                              "more memory", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def progress_bar(description: str, quiet: bool):
    """A rich progress bar with images/s and ETA, as a (context, callback) pair."""
    progress = Progress(TextColumn(description), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=err_console, disable=quiet, transient=False, auto_refresh=False)
    task = progress.add_task(description, total=None, rate="", start=False)

    def update(done: int, total: int) -> None:
        if not progress.live.is_started:  # appear only once there is work to show
            progress.start()
            progress.start_task(task)
        elapsed = progress.tasks[0].elapsed or 0.0
        rate = f"{done / elapsed:.1f} img/s" if elapsed > 0 else ""
        progress.update(task, completed=done, total=total, rate=rate)
        progress.refresh()

    return progress, update


def stop_bar(progress) -> None:
    """Stop a progress display if it ever showed: rich prints a blank line when stopping one that
    did not, and that blank line came before `error: ...`, breaking the one-line rule."""
    if progress.live.is_started:
        progress.stop()


def main() -> None:
    app(prog_name="featurecache")
