"""Do cached augmented views help? Test top-1 of logistic and MLP heads with K views (issue 18).

    python -m benchmarks.views --source digits --image-size 112 --views 0 2 4 8 --seeds 0 1 2
    python -m benchmarks.views --source ../shared/data/hymenoptera --image-size 112 --val-fraction 0.2

One extraction (resnet18, random weights with seed 0: no pretrained weights are
reachable here), its views added incrementally (K = 2, then 4, then 8: each step
computes only the new views; the time of each step is printed), then for each K and
each head seed: logistic (views stacked, and their mean) and MLP (one version per image
per epoch), and the MLP with feature-space augmentation (noise, mixup) at K = 0.
Head seeds vary the MLP's initialisation, batch order and view draws (and, with
--val-fraction, the carved validation rows); without --val-fraction the logistic head
is deterministic given its rows, so its spread over seeds is zero by construction.
The load average is printed after every phase: the machine is shared. Prints Markdown
tables (mean and min-max over seeds) for BENCHMARKS.md. Not part of `python -m
benchmarks`: it measures accuracy, not speed ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from featurecache import extract
from featurecache.extract.stage import ExtractSpec
from featurecache.fit.stage import FitSpec, fit_head

FEATURE_SPACE = (("feature_noise=0.5", {"feature_noise": 0.5}), ("feature_noise=1.0", {"feature_noise": 1.0}),
                 ("feature_mixup=0.2", {"feature_mixup": 0.2}), ("feature_mixup=1.0", {"feature_mixup": 1.0}))


def _load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def _fit(entry: Path, head: str, seed: int, name: str, val_fraction: float | None, **settings) -> tuple[float, str]:
    """(top-1, the split it is reported on) of one fitted head."""
    result = fit_head(entry, FitSpec(head=head, name=name, seed=seed, overwrite=True, val_fraction=val_fraction,
                                     **settings))
    return result.record["headline"]["top1"], result.record["headline"]["split"]


def _cell(values: list[float]) -> str:
    return f"{100 * statistics.fmean(values):.2f} ({100 * min(values):.2f}-{100 * max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="digits")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--views", type=int, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--augment", default="crop-flip")
    parser.add_argument("--root", default=None, help="cache root (default: a temporary folder)")
    parser.add_argument("--mlp-epochs", type=int, default=100)
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="choose on this fraction of train (for sources without a test split: val is then held out)")
    parser.add_argument("--no-feature-space", action="store_true", help="skip the feature_noise/feature_mixup rows")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="featurecache-views-"))
    base = dict(source=args.source, model=args.model, weights="random", image_size=args.image_size,
                root=str(root), augment=args.augment, precision="fp32")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; {_load()}; {args}",
          flush=True)
    timings = []
    for k in [0] + sorted(k for k in set(args.views) if k > 0):
        started = time.perf_counter()
        result = extract(ExtractSpec(**base, views=k))
        count = result.views.computed if k else result.computed
        timings.append((k, count, time.perf_counter() - started, _load()))
        print(f"extracted K={k}: {count} images through the backbone, {timings[-1][2]:.1f} s, {_load()}", flush=True)
    entry = result.path
    print(f"\nentry {entry}; rows {result.splits}\n")
    print("| K | images through the backbone in this step | seconds | cumulative seconds | load after |")
    print("|---|---|---|---|---|")
    total = 0.0
    for k, count, seconds, load in timings:
        total += seconds
        print(f"| {k} | {count} | {seconds:.1f} | {total:.1f} | {load} |", flush=True)
    mlp = {"epochs": args.mlp_epochs}
    table: dict[str, dict[int, list[float]]] = {label: {} for label in (
        "logistic, views stacked", "logistic, mean of views", "mlp, one version per image per epoch")}
    splits = set()

    def measure(label: str, k: int, head: str, name: str, **settings) -> None:
        started = time.perf_counter()
        values = []
        params = settings.pop("params", None)
        for seed in args.seeds:
            extra = {"params": {**params, "seed": seed}} if params is not None else {}
            top1, split = _fit(entry, head, seed, name, args.val_fraction, **settings, **extra)
            values.append(top1)
            splits.add(split)
        table.setdefault(label, {})[k] = values
        print(f"{label}, K={k}: {_cell(values)}, per seed {[round(100 * v, 2) for v in values]} "
              f"[{time.perf_counter() - started:.0f} s, {_load()}]", flush=True)

    for k in sorted(args.views):
        views = k or None
        chosen = {"view_set": args.augment} if k else {}  # the set of this policy: others may share the root
        measure("logistic, views stacked", k, "logistic", "logistic", views=views, **chosen)
        if k:
            measure("logistic, mean of views", k, "logistic", "logistic-mean", views=views, view_mode="mean", **chosen)
        measure("mlp, one version per image per epoch", k, "mlp", "mlp", views=views, params=dict(mlp), **chosen)
    if not args.no_feature_space:
        for label, extra in FEATURE_SPACE:
            measure(f"mlp, `{label}`", 0, "mlp", "mlp-aug", params={**mlp, **extra})
    ks = sorted(args.views)
    print(f"\ntop-1 % on {', '.join(sorted(splits))}, mean (min-max) of seeds {args.seeds}; {_load()}\n")
    print("| head | " + " | ".join(f"K={k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for label, cells in table.items():
        print(f"| {label} | " + " | ".join(_cell(cells[k]) if k in cells else "-" for k in ks) + " |")


if __name__ == "__main__":
    main()
