"""Imports every module that registers commands on the CLI app (one line per stage)."""
from . import cli_fit  # noqa: E402,F401  fit-head, heads, ensemble, predict, export, export-features
from . import cli_verify  # noqa: E402,F401  verify [--repair]
from . import cli_report  # noqa: E402,F401  report, run, demo
from . import cli_finetune  # noqa: E402,F401  finetune
