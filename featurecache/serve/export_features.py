"""Write a cache's features, labels, paths and splits in formats other tools read directly.

- `npy`: `DIR/<split>/features.npy` (N x ...), `labels.npy` (int64; -1 in an unlabeled
  split), `index.npy` (int64), `paths.npy` (unicode), plus `DIR/dataset.json` (classes,
  class ids, splits, unlabeled splits, tap, dtype, cache key). `np.load` reads each
  without pickle.
- `parquet` (needs pyarrow): `DIR/<split>.parquet` with columns `features` (a
  fixed-size list per row, flattened), `label`, `index`, `path`, and the same
  `dataset.json`.
- `hf` (needs datasets): a `DatasetDict` by split saved with `save_to_disk`, which
  `datasets.load_from_disk(DIR)` opens: columns `features` (a fixed-length list, or an
  `Array2D`..`Array5D` of the tap's shape), `label` (a `ClassLabel` with the cache's
  class names; -1 in an unlabeled split), `index`, `path`; plus the same `dataset.json`.

Features are written in the cache's storage dtype, bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..cache.atomic import write_atomic, write_json_atomic
from ..cache.integrity import prepare_output_folder
from ..cache.store import Cache

FORMATS = ("npy", "parquet", "hf")


def _save_npy(path: Path, values: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle: np.save would add ".npy" to the temporary name
        np.save(handle, values, allow_pickle=False)


def _describe(cache: Cache, tap: str) -> dict:
    return {"classes": cache.classes, "class_ids": cache.manifest.get("class_ids"), "splits": cache.splits,
            "unlabeled_splits": cache.unlabeled_splits, "tap": tap, "shape": list(cache.tap_shapes[tap]),
            "dtype": cache.manifest["dtype"], "cache": cache.path.name, "cache_key": cache.key}


def export_features(cache: Cache | str | Path, output: str | Path, *, format: str = "npy", tap: str = "pool",
                    splits: list[str] | None = None) -> Path:
    """Write `cache`'s features of `tap` (every split, or `splits`) under `output`; returns it."""
    from ..cache.store import open_cache

    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    output = Path(output)
    if format not in FORMATS:
        raise UsageError(f"unknown --format {format!r}; use one of {', '.join(FORMATS)}")
    if tap not in cache.tap_shapes:
        raise UsageError(f"tap {tap!r} is not in {cache.path.name} (it has {', '.join(cache.taps)})")
    chosen = splits or list(cache.splits)
    for i, split in enumerate(chosen):
        if split not in cache.splits:
            raise UsageError(f"split {split!r} is not in {cache.path.name}; it has: {', '.join(cache.splits)}")
        if split in chosen[:i]:
            raise UsageError(f"--split {split} is given twice; name each split once")
    prepare_output_folder(output, "features/")
    if format == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError("--format parquet needs pyarrow: pip install pyarrow") from None
    if format == "hf":
        try:
            import datasets
        except ImportError:
            raise UsageError('--format hf needs datasets: pip install "featurecache[hf]"') from None
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    try:
        description = _describe(cache, tap)
        if format == "hf":
            _save_hf(datasets, cache, tap, chosen, output)
        for split in chosen if format != "hf" else []:
            arrays = cache.arrays(split, tap)
            if format == "npy":
                folder = output / split
                folder.mkdir()
                for name, values in arrays.items():
                    write_atomic(folder / f"{name}.npy", lambda tmp, values=values: _save_npy(tmp, values),
                                 "the export")
            elif format == "parquet":
                flat = arrays["features"].reshape(len(arrays["features"]), -1)
                width = flat.shape[1]
                features = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width)
                table = pa.table({"features": features, "label": arrays["labels"], "index": arrays["index"],
                                  "path": arrays["paths"].tolist()})
                write_atomic(output / f"{split}.parquet", lambda tmp, table=table: pq.write_table(table, str(tmp)),
                             "the export")
        # (hf: beside dataset_dict.json, which is all load_from_disk reads)
        write_json_atomic(output / "dataset.json", {**description, "format": format, "exported_splits": chosen},
                          "the export's description")
    except BaseException:  # a damaged shard, a full disk, Ctrl-C: no half-written export is left behind
        if created:
            shutil.rmtree(output, ignore_errors=True)
        else:
            _empty(output)
        raise
    return output


def _empty(folder: Path) -> None:
    """Remove what the export wrote into a folder that was empty before it."""
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _save_hf(datasets, cache: Cache, tap: str, splits: list[str], output: Path) -> None:
    shape = tuple(cache.tap_shapes[tap])
    dtype = cache.manifest["dtype"]
    if len(shape) == 1:  # datasets 4 renamed Sequence to List
        vector = getattr(datasets, "List", None) or datasets.Sequence
        column = vector(datasets.Value(dtype), length=shape[0])
    elif len(shape) <= 5:
        column = getattr(datasets, f"Array{len(shape)}D")(shape=shape, dtype=dtype)
    else:
        raise UsageError(f"--format hf stores features of 1 to 5 dimensions; {tap} has shape {shape}")
    features = datasets.Features({"features": column, "label": datasets.ClassLabel(names=list(cache.classes)),
                                  "index": datasets.Value("int64"), "path": datasets.Value("string")})
    parts = {}
    for split in splits:
        arrays = cache.arrays(split, tap)
        parts[split] = datasets.Dataset.from_dict({"features": arrays["features"], "label": arrays["labels"],
                                                   "index": arrays["index"], "path": arrays["paths"].tolist()},
                                                  features=features, split=split)
    bars = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        datasets.DatasetDict(parts).save_to_disk(str(output))
    finally:
        if not bars:
            datasets.enable_progress_bars()
