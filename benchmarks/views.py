"""Do cached augmented views help? Test top-1 of logistic and MLP heads with K views (issue 18).

    python -m benchmarks.views --source digits --image-size 112 --views 0 2 4 8 --seeds 0 1 2
    python -m benchmarks.views --source ../shared/data/hymenoptera --image-size 112 --views 0 2 4

One extraction (resnet18, random weights with seed 0: no pretrained weights are
reachable here), its views added incrementally (K = 2, then 4, then 8: each step
computes only the new views; the time of each step is printed), then for each K and
each head seed: logistic (views stacked, and their mean) and MLP (one version per image
per epoch), and the MLP with feature-space augmentation (noise, mixup) at K = 0.
Head seeds vary the MLP's initialisation, batch order and view draws; the logistic
head is deterministic given its rows, so its spread over seeds is zero by construction.
Prints a Markdown table (mean and min-max over seeds) for BENCHMARKS.md. Not part of
`python -m benchmarks`: it measures accuracy, not speed ratios.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from featurecache import extract
from featurecache.extract.stage import ExtractSpec
from featurecache.fit.stage import FitSpec, fit_head


VAL_FRACTION = None


def _fit(entry: Path, head: str, seed: int, name: str, **settings) -> float:
    result = fit_head(entry, FitSpec(head=head, name=name, seed=seed, overwrite=True, val_fraction=VAL_FRACTION,
                                     **settings))
    return result.record["metrics"]["test"]["top1"] if "test" in result.record["metrics"] else \
        result.record["headline"]["top1"]


def _row(label: str, values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"| {label} | {100 * mean:.2f} | {100 * min(values):.2f}-{100 * max(values):.2f} | {len(values)} |"


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
    args = parser.parse_args()
    global VAL_FRACTION
    VAL_FRACTION = args.val_fraction
    root = Path(args.root or tempfile.mkdtemp(prefix="featurecache-views-"))
    base = dict(source=args.source, model=args.model, weights="random", image_size=args.image_size,
                root=str(root), augment=args.augment, precision="fp32")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args}")
    timings = []
    started = time.perf_counter()
    plain = extract(ExtractSpec(**base))
    timings.append((0, plain.computed, time.perf_counter() - started))
    for k in sorted(k for k in args.views if k > 0):
        started = time.perf_counter()
        result = extract(ExtractSpec(**base, views=k))
        timings.append((k, result.views.computed, time.perf_counter() - started))
    print(f"\nentry {plain.path}; rows {plain.splits}\n")
    print("| K | images through the backbone in this step | seconds | cumulative seconds |")
    print("|---|---|---|---|")
    total = 0.0
    for k, count, seconds in timings:
        total += seconds
        print(f"| {k} | {count} | {seconds:.1f} | {total:.1f} |", flush=True)
    mlp = {"epochs": args.mlp_epochs}
    rows = []
    for k in sorted(args.views):
        views = k or None
        rows.append(_row(f"logistic, K={k}" + (" (stacked)" if k else ""),
                         [_fit(plain.path, "logistic", s, "logistic", views=views) for s in args.seeds]))
        if k:
            rows.append(_row(f"logistic, K={k} (mean of views)",
                             [_fit(plain.path, "logistic", s, "logistic-mean", views=views, view_mode="mean")
                              for s in args.seeds]))
        rows.append(_row(f"mlp, K={k}", [_fit(plain.path, "mlp", s, "mlp", views=views, params={**mlp, "seed": s})
                                          for s in args.seeds]))
        print(*rows[-3 if k else -2:], sep="\n", flush=True)
    for label, extra in (("feature_noise=0.5", {"feature_noise": 0.5}), ("feature_noise=1.0", {"feature_noise": 1.0}),
                         ("feature_mixup=0.2", {"feature_mixup": 0.2}), ("feature_mixup=1.0", {"feature_mixup": 1.0})):
        rows.append(_row(f"mlp, K=0, {label}", [_fit(plain.path, "mlp", s, "mlp-aug", params={**mlp, **extra, "seed": s})
                                                 for s in args.seeds]))
        print(rows[-1], flush=True)
    print("\n| head | test top-1 % (mean) | min-max | seeds |\n|---|---|---|---|")
    print(*rows, sep="\n")


if __name__ == "__main__":
    main()
