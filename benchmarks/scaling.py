"""6. Scaling: extraction time and peak memory at 1x, 2x and 4x the images.

Each size runs in a fresh subprocess so its peak RSS is its own (ru_maxrss never goes
down within a process). Peak memory is the main process's; DataLoader workers are
reported separately.
"""

from __future__ import annotations

import json

from .common import Config, Row, generated_jpegs, run_child
from .extraction import fresh_root

_CHILD = """
import json, resource, sys
from featurecache.extract.stage import ExtractSpec, extract
spec = ExtractSpec(**json.loads(sys.argv[1]))
result = extract(spec)
print(json.dumps({"seconds": result.seconds, "computed": result.computed,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "workers_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def extract_in_subprocess(config: Config, folder, **overrides) -> dict:
    spec = dict(source=str(folder), model=config.model, weights="random", image_size=config.image_size,
                root=str(fresh_root(config)), shard_size=max(4, config.scaling_images))
    if config.tiny:
        spec.update(workers=0, batch_size=4)
    spec.update(overrides)
    return run_child(_CHILD, json.dumps(spec), in_process=config.in_process, what="scaling child")


def run(config: Config) -> list[Row]:
    size = (64, 48) if config.tiny else (500, 375)
    base = config.scaling_images
    results = {}
    for factor in config.scaling_factors:
        folder = generated_jpegs(config.workdir / "data" / f"scaling-{factor * base}", size, factor * base, seed=1)
        results[factor] = extract_in_subprocess(config, folder)
    rows, first = [], results[1]
    for factor, result in results.items():
        rows.append(Row("6", f"{factor}x = {factor * base} images: seconds", result["seconds"],
                        first["seconds"] * factor, "s", higher_is_better=False,
                        note=f"baseline = linear from 1x; {result['computed'] / result['seconds']:.1f} img/s"))
        rows.append(Row("6", f"{factor}x: peak RSS main process", result["rss_mib"], first["rss_mib"], "MiB",
                        higher_is_better=False, note=f"workers peak {result['workers_rss_mib']:.0f} MiB; vs 1x"))
    last = max(results)
    if last == 1:
        return rows
    marginal = (results[last]["seconds"] - first["seconds"]) / ((last - 1) * base)
    rows.append(Row("6", f"marginal seconds per image (1x -> {last}x)", marginal, None, "s",
                    note="fixed start-up cost excluded"))
    return rows
