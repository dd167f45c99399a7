"""`python -m benchmarks [--quick] [--only NAMES] [--compile] [--gpu]`: one table of ratios.

Every figure in the table is measured in this one process (scaling uses child
processes for their peak memory), on the same data, after a warm-up, as the median of
several interleaved repeats.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import tempfile
import time
from pathlib import Path

from .common import Config, Row, format_table, machine

# (name, module): the order of the table. `logistic` belongs to the heads benchmark
# (the logistic sweep vs scikit-learn); it runs only once benchmarks/logistic.py exists.
MODULES = [
    ("extraction", "benchmarks.extraction"),
    ("breakdown", "benchmarks.breakdown"),
    ("decode", "benchmarks.decode"),
    ("read", "benchmarks.read"),
    ("logistic", "benchmarks.logistic"),
    ("storage", "benchmarks.storage"),
    ("scaling", "benchmarks.scaling"),
    ("optimisations", "benchmarks.optimisations"),
    ("streaming", "benchmarks.streaming"),
    ("startup", "benchmarks.startup"),
]


def run_all(config: Config, only: list[str] | None = None, *, echo=print) -> list[Row]:
    rows: list[Row] = []
    for name, module_name in MODULES:
        if only and name not in only:
            continue
        if importlib.util.find_spec(module_name) is None:
            rows.append(Row("4" if name == "logistic" else "?", f"{name}: not written yet", None,
                            note=f"{module_name.replace('.', '/')}.py is absent"))
            continue
        started = time.perf_counter()
        module_rows = importlib.import_module(module_name).run(config)
        echo(f"[{name}: {time.perf_counter() - started:.0f} s]\n{format_table(module_rows)}\n")
        rows += module_rows
    return rows


def main(argv: list[str] | None = None) -> None:
    import sys

    if "--gpu" in (sys.argv[1:] if argv is None else argv):  # the GPU check: its own table (benchmarks/gpu.py)
        from .gpu import main as gpu_main

        raise SystemExit(gpu_main(argv))
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats: under 5 minutes")
    parser.add_argument("--only", nargs="+", choices=[name for name, _ in MODULES], help="run only these")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (about 30 s to compile)")
    parser.add_argument("--model", default=None, help="backbone (default resnet50)")
    parser.add_argument("--images", type=int, default=None, help="images per end-to-end extraction run "
                        "(default 128; 32 with --quick, where fixed start-up costs weigh more)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--gpu", action="store_true", help="run the GPU check instead (benchmarks/gpu.py); "
                        "on a machine without CUDA it says so and exits 0")
    args = parser.parse_args(argv)
    logging.getLogger("featurecache").setLevel(logging.WARNING)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="featurecache-bench-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        overrides = {"model": args.model} if args.model else {}
        if args.images:
            overrides["images"] = args.images
        config = Config.make(workdir, quick=args.quick, **overrides)
        config.extra["compile"] = args.compile or not args.quick
        print(f"machine: {machine()}")
        print(f"date: {time.strftime('%Y-%m-%d %H:%M')}; mode: {'quick' if args.quick else 'full'}; "
              f"model: {config.model}; repeats: {config.repeats} (median, interleaved)")
        print(f"hymenoptera: {config.hymenoptera or 'absent (generated JPEGs only)'}", flush=True)
        rows = run_all(config, args.only, echo=lambda text: print(text, flush=True))
        print()
        print(format_table(rows))
        print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
