"""Start-up: whole-process wall time of commands that need no backbone.

Each command runs in a fresh interpreter, exactly as a user's shell starts it
(`python -c "from featurecache.cli import main; main()" ARGS`, which is what the
`featurecache` console script runs), on a tiny cache entry with one logistic head. The
median of interleaved repeats is reported against the 1 s target; a bare
`python -c pass` is measured alongside as the floor.

    python -m benchmarks.startup                     # this tree
    python -m benchmarks.startup --source /old/tree  # another checkout (before/after)
    python -X importtime -c "import featurecache.cli" 2>&1 | sort -t'|' -k2 -n | tail
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import Config, Row

_MAIN = "import sys; from featurecache.cli import main; sys.argv[0] = 'featurecache'; main()"


def make_entry(workdir: Path) -> tuple[Path, Path]:
    """A tiny random-weights cache entry with one logistic head; returns (root, entry)."""
    from featurecache import extract, open_cache
    from featurecache.extract.stage import ExtractSpec
    from featurecache.fit.stage import FitSpec, fit_head

    from .common import generated_jpegs

    images = generated_jpegs(workdir / "startup-images", (48, 40), 8)
    spec = ExtractSpec(source=str(images), model="resnet18", weights="random", image_size=32, precision="fp32",
                       dtype="float32", batch_size=8, workers=0, root=str(workdir / "startup-cache"))
    result = extract(spec)
    fit_head(open_cache(result.path), FitSpec(head="logistic", val_fraction=0.5))
    return workdir / "startup-cache", result.path


def commands(root: Path, entry: Path) -> dict[str, list[str]]:
    return {"--help": ["--help"], "--version": ["--version"], "ls": ["ls", str(root)],
            "info": ["info", str(entry)], "heads": ["heads", str(entry)],
            "bad option": ["extract", "--no-such-option"]}


def time_commands(cases: dict[str, list[str]], repeats: int, source: Path | None = None, *,
                  warm: bool = True) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each command (and of a bare interpreter), interleaved,
    after an untimed round that warms the page cache (`warm=False`: none; the smoke test).

    CPU time (user + system of the child) is what a loaded machine does not inflate
    much; on an idle machine the two are close."""
    import resource

    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = f"{source}{os.pathsep}{env.get('PYTHONPATH', '')}"
    runs = {"python -c pass": [sys.executable, "-c", "pass"],
            **{name: [sys.executable, "-c", _MAIN, *arguments] for name, arguments in cases.items()}}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for round_ in range(0 if warm else 1, repeats + 1):  # round 0 warms the page cache
        for name, command in runs.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           cwd=source or None, check=False)
            wall = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            if round_:
                times[name].append((wall, cpu))
    return {name: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
            for name, values in times.items()}


def run(config: Config) -> list[Row]:
    root, entry = make_entry(config.workdir)
    repeats = 1 if config.tiny else config.repeats
    medians = time_commands(commands(root, entry), repeats, warm=not config.tiny)
    floor = medians.pop("python -c pass")[0]
    return [Row("S", f"start-up: featurecache {name}", wall, unit="s", higher_is_better=False, target="< 1 s",
                note=f"CPU {cpu:.2f} s; bare python {floor:.2f} s") for name, (wall, cpu) in medians.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None, help="a checkout of featurecache to time instead")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/featurecache-startup"))
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    root, entry = make_entry(args.workdir)
    load = os.getloadavg()[0]
    medians = time_commands(commands(root, entry), args.repeats, args.source)
    print(f"source: {args.source or 'this tree'}; {args.repeats} repeats, median; load average {load:.1f} before")
    print(f"  {'command':<16} {'wall':>7} {'CPU':>7}")
    for name, (wall, cpu) in medians.items():
        print(f"  {name:<16} {wall:6.2f}s {cpu:6.2f}s")


if __name__ == "__main__":
    main()
