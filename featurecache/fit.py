"""The fit-head stage: heads on cached features, chosen on validation, reported honestly.

Hyper-parameters are chosen on a validation split (the cache's own, or a stratified
fraction carved from train); the headline figure is the test split's when there is
one. A figure chosen and reported on the same split is labelled as such.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from . import __version__
from .errors import CorruptCacheError, HeadError, MismatchError
from .headstore import default_head_name, load_head, read_record, save_head
from .headstore import leaderboard  # noqa: F401  (public as featurecache.fit.leaderboard too)
from .heads import EnsembleHead, Head, make_head
from .metrics import classification_metrics
from .store import Cache, open_cache
from .streaming import available_memory, in_memory_bytes, streamed_probabilities
from .streaming_heads import fit_streaming_knn, fit_streaming_logistic, fit_streaming_mlp

log = logging.getLogger("featurecache")

STREAMING_HEADS = ("logistic", "mlp", "knn")


@dataclass(frozen=True, kw_only=True)
class FitSpec:
    """What `fit_head` needs; stored in head.json."""

    head: str = "logistic"  # logistic | mlp | knn | sklearn:<module>.<Estimator> | registered name
    name: str | None = None  # folder under heads/; defaults to the head type
    tap: str = "pool"
    params: dict[str, Any] = field(default_factory=dict)  # passed to the head's constructor
    val_fraction: float | None = None  # carve validation from train (stratified) instead of the val split
    refit: bool = False  # retrain the chosen setting on train + val
    seed: int = 0
    max_memory: int | None = None  # bytes of features to hold at once; None: half the available RAM


@dataclass
class FitResult:
    name: str
    path: Path
    head: Head
    record: dict


def _features(cache: Cache, split: str, tap: str) -> np.ndarray:
    values = cache.features(split, tap)
    values = values.reshape(len(values), -1)
    if not np.isfinite(values).all():
        raise CorruptCacheError(f"the {split} features of {cache.path.name} hold NaN or inf; "
                                "run featurecache verify, or extract again with --dtype float32")
    return values


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    indices = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    return train_test_split(indices, test_size=fraction, random_state=seed, stratify=stratify)


def _splits(cache: Cache, spec: FitSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train / val (for selection) / test arrays, with how val was obtained in the keys."""
    if cache.splits.get("train", 0) == 0:
        raise HeadError(f"{cache.path.name} has no training rows (splits: {cache.splits}); "
                        "extract a dataset with a train split")
    X, y = _features(cache, "train", spec.tap), cache.labels("train")
    data = {}
    if spec.val_fraction is None and cache.splits.get("val", 0) > 0:
        data["train"] = (X, y)
        data["val"] = (_features(cache, "val", spec.tap), cache.labels("val"))
    else:
        fraction = spec.val_fraction if spec.val_fraction is not None else 0.2
        if not 0 < fraction < 1:
            raise HeadError(f"--val-fraction must be between 0 and 1, got {fraction}")
        train, val = _stratified_split(y, fraction, spec.seed)
        data["train"], data["val (from train)"] = (X[train], y[train]), (X[val], y[val])
    if cache.splits.get("test", 0) > 0:
        data["test"] = (_features(cache, "test", spec.tap), cache.labels("test"))
    return data


def _evaluate(head: Head, data: dict, classes: list[str]) -> dict[str, dict]:
    return {split: classification_metrics(head.predict_proba(X), y, classes)
            for split, (X, y) in data.items() if split != "train" and len(y)}


def _headline(metrics: dict, refit: bool) -> dict:
    if "test" in metrics:
        return {"split": "test", "top1": metrics["test"]["top1"], "note": "chosen on validation, reported on test"}
    split = next(iter(metrics))
    note = "chosen and reported on the same split (optimistic)"
    if refit:
        note = "reported on data the refit trained on (optimistic)"
    return {"split": split, "top1": metrics[split]["top1"], "note": note}


def _budget(spec: FitSpec) -> int:
    return spec.max_memory if spec.max_memory is not None else available_memory() // 2


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _needs_streaming(cache: Cache, spec: FitSpec) -> bool:
    budget = _budget(spec)
    needed = in_memory_bytes(cache, spec.tap, list(cache.splits))
    if needed <= budget:
        return False
    if spec.head not in STREAMING_HEADS or spec.refit or spec.val_fraction is not None or not cache.splits.get("val"):
        raise HeadError(
            f"the {spec.tap} features need {_size(needed)}, over the memory budget of "
            f"{_size(budget)}; only the {', '.join(STREAMING_HEADS)} heads (without --refit or "
            "--val-fraction, with the cache's val split) stream from disk. Raise --max-memory or use one of them")
    return True


def _fit_streaming(cache: Cache, spec: FitSpec) -> tuple[Head, dict, str]:
    log.info("features exceed the memory budget: streaming shard by shard")
    for split in cache.splits:  # the same NaN/inf guard as the in-memory path, one shard at a time
        for rows in cache.iter_shards(split, spec.tap):
            if not np.isfinite(rows.features[spec.tap]).all():
                raise CorruptCacheError(f"the {split} features of {cache.path.name} hold NaN or inf; "
                                        "run featurecache verify")
    block_rows = 0  # network heads evaluate 1024 rows at a time
    if spec.head == "logistic":
        head = fit_streaming_logistic(cache, tap=spec.tap, seed=spec.seed, **spec.params)
    elif spec.head == "mlp":
        head = fit_streaming_mlp(cache, tap=spec.tap, **spec.params)
    else:  # knn reads the whole train split per block of queries, held twice as float32 (raw and
        # normalised): blocks of a quarter of the budget each
        block_rows = max(1, _budget(spec) // (4 * 4 * math.prod(cache.tap_shapes[spec.tap])))
        head = fit_streaming_knn(cache, tap=spec.tap, block_rows=block_rows, **spec.params)
    metrics = {split: classification_metrics(*streamed_probabilities(head, cache, split, spec.tap, block_rows),
                                             cache.classes)
               for split in ("val", "test") if cache.splits.get(split)}
    return head, metrics, "val"


def fit_head(cache: Cache | str | Path, spec: FitSpec) -> FitResult:
    """Fit one head on a cache and write it to `heads/<name>/` with its metrics.

    Features over the memory budget (`spec.max_memory`) are streamed from the shards
    (logistic, mlp and knn heads); otherwise every split is loaded once.
    """
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    if spec.tap not in cache.tap_shapes:
        raise HeadError(f"tap {spec.tap!r} is not in {cache.path.name} (it has {', '.join(cache.taps)})")
    if spec.refit and spec.head != "logistic":
        raise HeadError("--refit is supported for the logistic head")
    started = time.perf_counter()
    streaming = _needs_streaming(cache, spec)
    if streaming:
        head, metrics, val_name = _fit_streaming(cache, spec)
        rows = dict(cache.splits)
    else:
        data = _splits(cache, spec)
        (X, y), (val_name, (X_val, y_val)) = data["train"], list(data.items())[1]
        head = make_head(spec.head, **spec.params, **({"refit": True} if spec.refit else {}))
        head.fit(X, y, X_val, y_val, n_classes=len(cache.classes))
        metrics = _evaluate(head, data, cache.classes)
        rows = {split: int(len(labels)) for split, (_, labels) in data.items()}
    seconds = time.perf_counter() - started
    record = {
        "head": spec.head, "tap": spec.tap, "cache_key": cache.key, "cache": cache.path.name,
        "classes": cache.classes, "selection_split": val_name,
        "chosen": getattr(head, "best_params_", None), "metrics": metrics,
        "headline": _headline(metrics, spec.refit), "fit_seconds": seconds, "rows": rows,
        "streamed": streaming,
        "spec": {"head": spec.head, "tap": spec.tap, "params": spec.params, "val_fraction": spec.val_fraction,
                 "refit": spec.refit, "seed": spec.seed, "max_memory": spec.max_memory},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tool_version": __version__,
    }
    name = spec.name or default_head_name(spec.head)
    path = save_head(cache, name, head, record)
    log.info("head %s: %s top-1 %.4f", name, record["headline"]["split"], record["headline"]["top1"])
    return FitResult(name, path, head, read_record(cache, name))


def make_ensemble(cache: Cache | str | Path, members: list[str], *, name: str,
                  weights: list[float] | None = None) -> FitResult:
    """Soft voting: a weighted average of the members' probabilities, saved as a head."""
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    if not members:
        raise HeadError("name at least one head to ensemble")
    if weights is not None and len(weights) != len(members):
        raise HeadError(f"{len(weights)} weights for {len(members)} heads; give one weight per head")
    loaded = [load_head(cache, member) for member in members]
    taps = {record["tap"] for _, record in loaded}
    if len(taps) > 1:
        raise MismatchError(f"heads {', '.join(members)} use different taps ({', '.join(sorted(taps))})")
    tap = taps.pop()
    head = EnsembleHead.from_members([h for h, _ in loaded], weights, list(members))
    spec = FitSpec(head="ensemble", tap=tap, val_fraction=None)
    data = _splits(cache, spec)
    metrics = _evaluate(head, data, cache.classes)
    record = {
        "head": "ensemble", "tap": tap, "cache_key": cache.key, "cache": cache.path.name,
        "classes": cache.classes, "selection_split": None, "members": members,
        "weights": list(head._normalized_weights()), "metrics": metrics,
        "headline": _headline(metrics, False) | ({} if "test" in metrics else
                                                 {"note": "members were chosen on this split (optimistic)"}),
        "fit_seconds": 0.0, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tool_version": __version__,
    }
    path = save_head(cache, name, head, record)
    return FitResult(name, path, head, read_record(cache, name))
