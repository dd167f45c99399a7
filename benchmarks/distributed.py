"""Distributed extraction: 2 torchrun ranks versus 1 process, same images, same command.

Both runs are the real command line in fresh processes, with the defaults a user gets
(threads, decode workers). Reported twice: the extract time rank 0 prints (model
build, decoding, forward pass, shard writing), and the wall time of the whole command
(plus Python and torch start-up, and for torchrun the launcher and the rendezvous).
On a machine with C cores the ceiling is min(ranks, devices)x; on the CPU, ranks share
the same cores, so it is what one process leaves idle (decoding stalls, serial parts).

    python -m benchmarks.distributed [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from featurecache.extract.distributed import launch_command

from .common import Config, Row, format_table, generated_jpegs


def _extract(folder: Path, root: Path, model: str, ranks: int, extra: list[str]) -> tuple[float, float]:
    """(extract seconds as printed, wall seconds of the whole command)."""
    argv = ["extract", str(folder), "--model", model, "--weights", "random", "--root", str(root), *extra]
    command = launch_command(argv, ranks) if ranks > 1 else [sys.executable, "-m", "featurecache", *argv]
    environment = {**os.environ, "FEATURECACHE_OFFLINE": "1", "COLUMNS": "200"}
    started = time.perf_counter()
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"extract with {ranks} process(es) failed: {done.stderr[-2000:]}")
    return float(re.search(r"extracted \d+ images in ([\d.]+)s", done.stdout)[1]), wall


def run(config: Config) -> list[Row]:
    images = 16 if config.tiny else 32 if config.quick else 64
    folder = generated_jpegs(config.workdir / "data" / f"distributed-{images}", (500, 375), images, seed=3)
    extra = ["--image-size", "32", "--workers", "0", "--batch-size", "4"] if config.tiny else []
    extra += ["--shard-size", str(max(4, images // 4))]  # 4 shards: 2 per rank
    repeats = 1 if config.tiny or config.quick else 2
    figures = {1: [], 2: []}
    for repeat in range(repeats):
        for ranks in (1, 2):  # interleaved, so load from other users hits both alike
            root = config.workdir / f"distributed-cache-{ranks}-{repeat}"
            figures[ranks].append(_extract(folder, root, config.model, ranks, extra))
    best = {ranks: (min(f[0] for f in runs), min(f[1] for f in runs)) for ranks, runs in figures.items()}
    note = f"{images} JPEGs 500x375, {config.model}, best of {repeats}; ceiling 2x"
    return [
        Row("D", "2 ranks vs 1 process: extract seconds", best[2][0], best[1][0], "s",
            higher_is_better=False, note=f"{note}; {images / best[2][0]:.1f} vs {images / best[1][0]:.1f} img/s"),
        Row("D", "2 ranks vs 1 process: wall seconds incl. start-up", best[2][1], best[1][1], "s",
            higher_is_better=False, note="torchrun launcher + rendezvous + 2 torch imports"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 images, one repeat")
    parser.add_argument("--tiny", action="store_true", help="smoke test: resnet18 at 32 px, 16 images")
    parser.add_argument("--model", default=None, help="backbone (default resnet50)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="featurecache-bench-") as scratch:
        overrides = {"model": args.model} if args.model else {}
        config = Config.make(Path(scratch), quick=args.quick, tiny=args.tiny, **overrides)
        print(format_table(run(config)))


if __name__ == "__main__":
    main()
