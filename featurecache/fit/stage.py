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

from .. import __version__
from ..errors import CorruptCacheError, HeadError, MismatchError
from .headstore import (check_head_name, default_head_name, load_head, member_names, read_record,
                        read_record_with_checksum, refuse_taken, save_head)
from ..heads.knn import KNNHead
from ..heads.registry import EnsembleHead, Head, SklearnHead, make_head, streaming_heads
from .headstore import leaderboard  # noqa: F401  (public as featurecache.fit.leaderboard too)
from ..heads.metrics import classification_metrics
from ..cache.coverage import untaught_classes_of
from ..data.copies import copy_warnings
from ..cache.store import Cache, open_cache
from ..cache.streaming import available_memory, in_memory_bytes, streamed_probabilities
from ..heads.streaming import StreamedData
from .views import check_views_spec, fit_with_views, train_views
from .carve import BY_PATH, carve, carved_rows

log = logging.getLogger("featurecache")



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
    overwrite: bool = False  # replace an existing head of the same name (refused otherwise)
    views: int | str | None = None  # train on K cached augmented views per image ("all": every one); see fit/views.py
    view_set: str | None = None  # which view set: a policy (crop-flip, ...) or a view key prefix; None: the only one
    view_mode: str | None = None  # logistic and sklearn heads: stack (default) or mean of the views


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


def single_row_classes(labels: np.ndarray, classes: list[str]) -> list[str]:
    counts = np.bincount(labels[labels >= 0], minlength=len(classes))
    return [classes[i] for i in np.flatnonzero(counts == 1)]


def _splits(cache: Cache, spec: FitSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train / val (for selection) / test arrays, with how val was obtained in the keys."""
    labeled = cache.labeled_splits  # unlabeled splits are never fitted or scored
    if labeled.get("train", 0) == 0:
        raise HeadError(f"{cache.path.name} has no training rows with labels (splits: {cache.splits}"
                        + (f", unlabelled: {', '.join(cache.unlabeled_splits)}" if cache.unlabeled_splits else "")
                        + "); extract a dataset with a labelled train split")
    X, y = _features(cache, "train", spec.tap), cache.labels("train")
    data = {}
    if spec.val_fraction is None and labeled.get("val", 0) > 0:
        data["train"] = (X, y)
        data["val"] = (_features(cache, "val", spec.tap), cache.labels("val"))
    else:
        fraction = spec.val_fraction if spec.val_fraction is not None else 0.2
        train, val = carve(cache, fraction, spec.seed)  # by path: the same rows whatever the shard order
        single = single_row_classes(y, cache.classes)
        if single:
            log.warning("%d class(es) have a single training image and get no validation row (%s%s)", len(single),
                        ", ".join(single[:5]), ", ..." if len(single) > 5 else "")
        data["train"], data["val (from train)"] = (X[train], y[train]), (X[val], y[val])
        if labeled.get("val", 0) > 0 and not labeled.get("test"):
            # No labelled test (Tiny-ImageNet): the cache's val, unseen by the selection, is the held-out figure.
            data["val"] = (_features(cache, "val", spec.tap), cache.labels("val"))
    if labeled.get("test", 0) > 0:
        data["test"] = (_features(cache, "test", spec.tap), cache.labels("test"))
    return data


def _evaluate(head: Head, data: dict, classes: list[str]) -> dict[str, dict]:
    return {split: classification_metrics(head.predict_proba(X), y, classes, f"{split} rows")
            for split, (X, y) in data.items() if split != "train" and len(y)}


def _headline(metrics: dict, refit: bool) -> dict:
    if "test" in metrics:
        return {"split": "test", "top1": metrics["test"]["top1"], "note": "chosen on validation, reported on test"}
    if "val" in metrics and "val (from train)" in metrics:  # refit trains on train + the carved fraction only
        return {"split": "val", "top1": metrics["val"]["top1"],
                "note": "chosen on a fraction of train, reported on the held-out val split"}
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
    needed = in_memory_bytes(cache, spec.tap, list(cache.labeled_splits))
    if needed <= budget:
        return False
    if (not make_head(spec.head, **spec.params).streams or spec.refit or spec.val_fraction is not None
            or not cache.labeled_splits.get("val")):
        raise HeadError(
            f"the {spec.tap} features need {_size(needed)}, over the memory budget of "
            f"{_size(budget)}; only the {', '.join(streaming_heads())} heads (without --refit or "
            "--val-fraction, with the cache's val split) stream from disk. Raise --max-memory or use one of them")
    return True


def _fit_streaming(cache: Cache, spec: FitSpec) -> tuple[Head, dict, str]:
    log.info("features exceed the memory budget: streaming shard by shard")
    for split in cache.labeled_splits:  # the same NaN/inf guard as the in-memory path, one shard at a time
        for rows in cache.iter_shards(split, spec.tap):
            if not np.isfinite(rows.features[spec.tap]).all():
                raise CorruptCacheError(f"the {split} features of {cache.path.name} hold NaN or inf; "
                                        "run featurecache verify")
    head = make_head(spec.head, **spec.params)  # the same parameters, and checks, as in memory
    block_rows = 0  # network heads evaluate 1024 rows at a time
    if isinstance(head, KNNHead):  # k-NN reads the whole train split per block of queries, held
        # twice as float32 (raw and normalised): blocks of a quarter of the budget each
        block_rows = max(1, _budget(spec) // (4 * 4 * math.prod(cache.tap_shapes[spec.tap])))
    head = head.fit_streamed(StreamedData(cache, spec.tap, "val", spec.seed, block_rows))
    metrics = {split: classification_metrics(*streamed_probabilities(head, cache, split, spec.tap, block_rows),
                                             cache.classes, f"{split} rows")
               for split in ("val", "test") if cache.labeled_splits.get(split)}
    return head, metrics, "val"


def check_fit_spec(spec: FitSpec) -> None:
    """Refuse bad settings before any work: types, ranges, the name, the head's parameters."""
    if not isinstance(spec.params, dict):
        raise HeadError(f"head parameters must be a table of name = value, got {spec.params!r}")
    if "refit" in spec.params:  # the record would say validation was never trained on
        raise HeadError("refit is not a head parameter: pass --refit (in a pipeline, refit = true beside params), "
                        "so the head's record says its validation rows were trained on")
    if "n_classes" in spec.params:
        raise HeadError("n_classes is not a head parameter: the classes are the cache's")
    if spec.val_fraction is not None and not (isinstance(spec.val_fraction, (int, float))
                                              and not isinstance(spec.val_fraction, bool)
                                              and 0 < spec.val_fraction < 1):
        raise HeadError(f"--val-fraction must be a number between 0 and 1 (exclusive), got {spec.val_fraction!r}")
    if not isinstance(spec.seed, int) or isinstance(spec.seed, bool) or not 0 <= spec.seed < 2**32:
        raise HeadError(f"--seed must be an integer from 0 to 2**32 - 1, got {spec.seed!r}")
    if spec.max_memory is not None and not (isinstance(spec.max_memory, int) and spec.max_memory > 0):
        raise HeadError(f"--max-memory must be a positive number of bytes, got {spec.max_memory!r}")
    if spec.refit and spec.head != "logistic":
        raise HeadError("--refit is supported for the logistic head")
    if spec.head == "ensemble":
        raise HeadError("make an ensemble with featurecache ensemble, not fit-head")
    check_views_spec(spec.views, spec.view_mode)
    check_head_name(spec.name or default_head_name(spec.head))
    make_head(spec.head, **spec.params)  # the head's own checks, and sklearn's for its estimators


def fit_head(cache: Cache | str | Path, spec: FitSpec) -> FitResult:
    """Fit one head on a cache and write it to `heads/<name>/` with its metrics.

    Features over the memory budget (`spec.max_memory`) are streamed from the shards
    (logistic, mlp and knn heads); otherwise every split is loaded once. An existing head
    of the same name is replaced only with `spec.overwrite`.
    """
    check_fit_spec(spec)
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    name = spec.name or default_head_name(spec.head)
    refuse_taken(cache, name, spec.overwrite)
    if spec.tap not in cache.tap_shapes:
        raise HeadError(f"tap {spec.tap!r} is not in {cache.path.name} (it has {', '.join(cache.taps)}); pass "
                        f"--tap {cache.taps[0]}, or extract again with --tap {spec.tap}")
    started = time.perf_counter()
    streaming = _needs_streaming(cache, spec)
    notes = untaught_classes_of(cache) + copy_warnings(cache.manifest.get("copies") or [])
    augmenting = spec.views is not None or any(spec.params.get(p) for p in ("feature_noise", "feature_mixup"))
    if streaming and augmenting:
        raise HeadError("views and feature-space augmentation need the features in memory; raise --max-memory")
    views_info = None
    if streaming:
        head, metrics, val_name = _fit_streaming(cache, spec)
        rows = dict(cache.labeled_splits)
    else:
        data = _splits(cache, spec)
        (X, y), (val_name, (X_val, y_val)) = data["train"], list(data.items())[1]
        head = make_head(spec.head, **spec.params, **({"refit": True} if spec.refit else {}))
        if isinstance(head, SklearnHead):
            head.check_saveable(X, y, len(cache.classes))  # before the real fit: refused early, not after
        bank, views_info = train_views(cache, spec, _train_rows(cache, spec))
        fit_with_views(head, X, y, X_val, y_val, len(cache.classes), bank, views_info)
        metrics = _evaluate(head, data, cache.classes)
        rows = {split: int(len(labels)) for split, (_, labels) in data.items()}
        if val_name != "val":
            single = single_row_classes(np.concatenate([y, y_val]), cache.classes)
            if single:
                notes.append(f"{len(single)} class(es) have a single training image and no validation row")
    seconds = time.perf_counter() - started
    record = {
        "head": spec.head, "tap": spec.tap, "cache_key": cache.key, "cache": cache.path.name,
        "classes": cache.classes, "selection_split": val_name,
        "chosen": getattr(head, "best_params_", None), "metrics": metrics,
        "headline": _headline(metrics, spec.refit), "fit_seconds": seconds, "rows": rows,
        "streamed": streaming, "validation": _validation(val_name, spec), "notes": notes, "views": views_info,
        "spec": {"head": spec.head, "tap": spec.tap, "params": spec.params, "val_fraction": spec.val_fraction,
                 "refit": spec.refit, "seed": spec.seed, "max_memory": spec.max_memory, "views": spec.views,
                 "view_set": spec.view_set, "view_mode": spec.view_mode},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tool_version": __version__,
    }
    path = save_head(cache, name, head, record, overwrite=spec.overwrite)
    log.info("head %s: %s top-1 %.4f", name, record["headline"]["split"], record["headline"]["top1"])
    return FitResult(name, path, head, read_record(cache, name))


def _train_rows(cache: Cache, spec: FitSpec) -> np.ndarray:
    """Positions in the cache's train split of the rows `_splits` trains on (not the carved validation)."""
    labels = cache.labels("train")
    if spec.val_fraction is None and cache.labeled_splits.get("val", 0) > 0:
        return np.arange(len(labels))
    return carve(cache, spec.val_fraction if spec.val_fraction is not None else 0.2, spec.seed)[0]


def _validation(val_name: str, spec: FitSpec) -> dict:
    """Which rows chose the head's settings, and whether it also trained on them (refit)."""
    if val_name == "val":
        return {"split": "val", "trained_on": bool(spec.refit)}
    fraction = spec.val_fraction if spec.val_fraction is not None else 0.2
    return {"split": "train", "fraction": float(fraction), "seed": int(spec.seed), "carve": BY_PATH,
            "trained_on": bool(spec.refit)}


def head_validation(record: dict) -> dict:
    """The `validation` of a head record (derived for records that predate the field)."""
    if isinstance(record.get("validation"), dict):
        return record["validation"]
    spec = record.get("spec") or {}
    if record.get("selection_split") == "val":
        return {"split": "val", "trained_on": bool(spec.get("refit"))}
    return {"split": "train", "fraction": float(spec.get("val_fraction") or 0.2), "seed": int(spec.get("seed") or 0),
            "trained_on": bool(spec.get("refit"))}


def _describe_validation(validation: dict) -> str:
    if validation["split"] == "val":
        return "the cache's val split"
    how = "" if validation.get("carve") == BY_PATH else " (carved by row position: fitted before carving went by path)"
    return f"{validation['fraction']:g} of train with seed {validation['seed']}{how}"


def shared_validation(records: dict[str, dict]) -> dict:
    """The validation every member was chosen on (refused when they differ), and whether any trained on it."""
    validations = {name: head_validation(record) for name, record in records.items()}
    keys = {name: {k: v for k, v in validation.items() if k != "trained_on"} for name, validation in validations.items()}
    first = next(iter(keys))
    for name, key in keys.items():
        if key != keys[first]:
            raise HeadError(
                f"the members were validated on different rows: {first!r} on {_describe_validation(keys[first])}, "
                f"{name!r} on {_describe_validation(key)}; an ensemble scored on either would be scored on rows "
                "another member trained on. Fit them with the same --val-fraction and --seed (or all on the "
                "cache's val split)")
    return {**keys[first], "trained_on": any(v["trained_on"] for v in validations.values())}


def ensemble_splits(caches: list[Cache], validation: dict) -> list[str]:
    """The splits an ensemble is scored on: its members' own validation rows (which none of them
    trained on, unless refitted), and test where every entry has it labelled."""
    splits = []
    if not validation["trained_on"]:
        lacking = [cache.path.name for cache in caches if not cache.labeled_splits.get("val")]
        if validation["split"] == "val" and lacking:
            raise HeadError(f"the members were validated on the val split, which {lacking[0]} no longer has")
        splits.append("val" if validation["split"] == "val" else "val (from train)")
    if all(cache.labeled_splits.get("test", 0) > 0 for cache in caches):  # an unlabelled test is never scored
        splits.append("test")
    if not splits:
        raise HeadError("every row the members were validated on was also trained on (--refit), and there is no "
                        "labelled test split: no rows are left to score the ensemble honestly")
    return splits


def ensemble_rows(cache: Cache, split: str, validation: dict | None) -> tuple[str, np.ndarray | None]:
    """(the cache's split, its rows; None: all) that an ensemble's scoring split `split` names."""
    if split == "val (from train)":
        return "train", carved_rows(cache, validation)[1]
    return split, None


def _ensemble_data(cache: Cache, tap: str, records: dict[str, dict]) -> tuple[dict, dict]:
    """The rows to score an ensemble on (`ensemble_splits`); members validated on different rows are refused."""
    validation = shared_validation(records)
    data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in ensemble_splits([cache], validation):
        name, rows = ensemble_rows(cache, split, validation)
        X, y = _features(cache, name, tap), cache.labels(name)
        data[split] = (X, y) if rows is None else (X[rows], y[rows])
    return data, validation


def refuse_own_member(name: str, members: list[str]) -> None:
    if name in members:
        raise HeadError(f"an ensemble cannot take the name of its member {name!r}: it would replace the head it "
                        "is made of; choose another --name")


def ensemble_record(cache: Cache, head: str, tap: str, weights: list[float], validation: dict, metrics: dict,
                    **fields) -> dict:
    """The record of an ensemble (of one entry's heads or across entries): headline on test when there is one."""
    headline = _headline(metrics, False)
    if headline["split"] != "test":
        headline["note"] = "members were chosen on this split (optimistic)"
    return {"head": head, "tap": tap, "cache_key": cache.key, "cache": cache.path.name, "classes": cache.classes,
            "selection_split": None, **fields, "weights": [float(w) for w in weights], "validation": validation,
            "metrics": metrics, "headline": headline, "fit_seconds": 0.0,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tool_version": __version__}


def check_ensemble_weights(weights: list[float] | None, count: int) -> None:
    if weights is not None and len(weights) != count:
        raise HeadError(f"{len(weights)} weights for {count} heads; give one weight per head")
    if weights is not None and not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                                       and w >= 0 for w in weights) or (weights is not None and sum(weights) <= 0):
        raise HeadError(f"ensemble weights must be non-negative numbers, not all zero; got {weights}")


def make_ensemble(cache: Cache | str | Path, members: list[str | tuple[str | Path | Cache, str]], *, name: str,
                  weights: list[float] | None = None, overwrite: bool = False) -> FitResult:
    """Soft voting: a weighted average of the members' probabilities, saved as a head.

    Scored on rows none of its members trained on (their shared validation rows, and
    test). It records each member's checksum: once a member changes, it is stale.
    A member given as (entry, head) is a head of another entry of the same source: see
    `featurecache.fit.cross_ensemble`."""
    check_head_name(name, "ensemble")
    if not members:
        raise HeadError("name at least one head to ensemble")
    if any(not isinstance(member, str) for member in members):  # (entry, head): heads of other entries
        from .cross_ensemble import make_cross_ensemble

        return make_cross_ensemble(cache, members, name=name, weights=weights, overwrite=overwrite)
    for member in members:
        check_head_name(member, "member")
    if len(set(members)) != len(members):
        raise HeadError(f"a head is named twice among the members ({', '.join(members)})")
    refuse_own_member(name, members)
    check_ensemble_weights(weights, len(members))
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    refuse_taken(cache, name, overwrite)
    for member in members:
        if name in member_names(cache, member):
            raise HeadError(f"member {member!r} contains {name!r}: an ensemble cannot contain itself")
    loaded, checksums = [], {}
    for member in members:
        head, record = load_head(cache, member)
        loaded.append((head, record))
        checksums[member] = read_record_with_checksum(cache, member)[1]
    taps = {record["tap"] for _, record in loaded}
    if len(taps) > 1:
        raise MismatchError(f"heads {', '.join(members)} use different taps ({', '.join(sorted(taps))})")
    tap = taps.pop()
    head = EnsembleHead.from_members([h for h, _ in loaded], weights, list(members))
    data, validation = _ensemble_data(cache, tap, {m: r for m, (_, r) in zip(members, loaded)})
    record = ensemble_record(cache, "ensemble", tap, head.weights_, validation,
                             _evaluate(head, data, cache.classes), members=members, member_checksums=checksums)
    path = save_head(cache, name, head, record, overwrite=overwrite)
    return FitResult(name, path, head, read_record(cache, name))
