"""The `featurecache` command line: parses options, calls the library, renders results, maps errors.

`app` (with the shared options and error mapping) lives in `app`; each command group
registers its commands on it from its own module, listed here explicitly. Command
modules import only `app`, never each other, and the library never imports the CLI.
"""

from .app import app
from . import cache_commands  # noqa: F401  extract, ls, info, sources
from . import fit_commands  # noqa: F401  fit-head, heads, ensemble, predict, export, export-features
from . import verify_commands  # noqa: F401  verify [--repair]
from . import report_commands  # noqa: F401  report, run, demo
from . import finetune_commands  # noqa: F401  finetune
from . import compare_commands  # noqa: F401  compare

__all__ = ["app", "main"]


def main() -> None:
    app(prog_name="featurecache")
