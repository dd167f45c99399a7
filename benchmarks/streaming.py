"""7. Streaming heads: peak memory of fitting out of core against fitting in memory.

A synthetic cache (Gaussian classes, post-ReLU, float16 shards as extract writes them)
whose float32 features exceed the streaming budget. Each (head, path) fits in a fresh
subprocess, so that its peak is its own: after the same fit on a tiny cache (so that
lazy imports and one-off allocations are not counted), the peak RSS (VmHWM) is reset
and the figure is its rise over the RSS before `fit_head`, which reads the features,
fits, evaluates val and test and saves the head. Memory figures do not depend on
machine load; seconds do.
"""

from __future__ import annotations

import json

import numpy as np

from .common import Config, Row, run_child
from .logistic import synthetic
from .read import write_splits

_CHILD = """
import json, resource, sys, time
args = json.loads(sys.argv[1])
from featurecache.fit.stage import FitSpec, fit_head
from featurecache.cache.store import open_cache

def status(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith(key))

def fit(path, name, max_memory):
    return fit_head(open_cache(path), FitSpec(head=args["head"], name=name, params=args["params"],
                                              max_memory=max_memory, overwrite=True)).record

# The same path on a tiny cache first: one-off lazy imports and allocations are not the fit's.
fit(args["warmup"], "warmup", 1 if args["max_memory"] < 1 << 40 else args["max_memory"])
try:  # reset the peak to the current RSS (Linux >= 4.0), so imports do not count
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    start = status("VmRSS:")
except OSError:
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
started = time.perf_counter()
record = fit(args["cache"], args["name"], args["max_memory"])
seconds = time.perf_counter() - started
try:
    peak = status("VmHWM:")
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_mib": peak - start, "streamed": record["streamed"],
                  "top1": record["metrics"]["test"]["top1"]}))
"""


def sizes(config: Config) -> dict:
    """Rows per split, feature width, budget and the heads (with parameters) for this mode;
    every (head, path) costs a subprocess start (torch and scikit-learn imports, 2-6 s)."""
    if config.tiny:
        return {"rows": (600, 150, 150), "dim": 64, "budget": 64 << 10, "heads": {"logistic": {}}}
    if config.quick:
        return {"rows": (4000, 1000, 1000), "dim": 512, "budget": 2 << 20,
                "heads": {"logistic": {}, "mlp": {"epochs": 1, "hidden_sizes": [64]}}}
    return {"rows": (20_000, 5_000, 5_000), "dim": 2048, "budget": 48 << 20,
            "heads": {"logistic": {}, "mlp": {"epochs": 4}, "knn": {}}}


def build_cache(config: Config, rows: tuple[int, int, int], dim: int, classes: int = 10):
    """The benchmark entry: train/val/test of synthetic features in 4096-row float16 shards."""
    features, labels = synthetic(sum(rows), dim, classes, seed=0)
    bounds = np.cumsum((0,) + rows)
    splits = {name: (features[a:b], labels[a:b]) for name, a, b in zip(("train", "val", "test"), bounds, bounds[1:])}
    return write_splits(config.workdir / f"streaming-{sum(rows)}x{dim}", splits, [str(c) for c in range(classes)])


def fit_in_subprocess(cache, warmup, head: str, name: str, params: dict, max_memory: int, *,
                      in_process: bool = False) -> dict:
    """Fit one head in a fresh process, after the same fit on the `warmup` cache; its figures
    (`in_process`: in this process, for the smoke test; see common.run_child)."""
    arguments = {"cache": str(cache), "warmup": str(warmup), "head": head, "name": name, "params": params,
                 "max_memory": max_memory}
    return run_child(_CHILD, json.dumps(arguments), in_process=in_process, what="streaming benchmark child")


def run(config: Config) -> list[Row]:
    size = sizes(config)
    cache = build_cache(config, size["rows"], size["dim"])
    warmup = build_cache(config, (100, 50, 50), size["dim"])
    feature_mib = sum(size["rows"]) * size["dim"] * 4 / 2**20
    budget_mib = size["budget"] / 2**20
    rows = []
    for head, params in size["heads"].items():
        memory = fit_in_subprocess(cache, warmup, head, f"{head}-memory", params, 1 << 50,
                                   in_process=config.in_process)
        streamed = fit_in_subprocess(cache, warmup, head, f"{head}-streamed", params, size["budget"],
                                     in_process=config.in_process)
        if not streamed["streamed"] or memory["streamed"]:
            raise RuntimeError(f"{head}: the budget did not separate the streaming and in-memory paths")
        rows.append(Row("7", f"{head}: peak RSS rise, streaming vs in memory", streamed["peak_mib"],
                        memory["peak_mib"], "MiB", higher_is_better=False,
                        note=f"features {feature_mib:,.0f} MiB as float32, budget {budget_mib:g} MiB"))
        rows.append(Row("7", f"{head}: seconds to fit", streamed["seconds"], memory["seconds"], "s",
                        higher_is_better=False, note="depends on machine load"))
        rows.append(Row("7", f"{head}: test top-1", 100 * streamed["top1"], 100 * memory["top1"], "%",
                        note=f"{size['rows'][2]:,} test rows"))
    return rows
