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

Features are written in the cache's storage dtype, bit for bit. The folder appears whole
or not at all (see `export_features`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..faults import fault_point
from ..cache.atomic import atomic_folder, json_text
from ..cache.integrity import output_parents, prepare_output_folder
from ..cache.store import Cache

FORMATS = ("npy", "parquet", "hf")


def _save_npy(path: Path, values: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, values, allow_pickle=False)


def _describe(cache: Cache, tap: str) -> dict:
    return {"classes": cache.classes, "class_ids": cache.manifest.get("class_ids"), "splits": cache.splits,
            "unlabeled_splits": cache.unlabeled_splits, "tap": tap, "shape": list(cache.tap_shapes[tap]),
            "dtype": cache.manifest["dtype"], "cache": cache.path.name, "cache_key": cache.key}


def export_features(cache: Cache | str | Path, output: str | Path, *, format: str = "npy", tap: str = "pool",
                    splits: list[str] | None = None) -> Path:
    """Write `cache`'s features of `tap` (every split, or `splits`) under `output`; returns it.

    The folder appears complete or not at all: it is written under a temporary name beside it
    and renamed into place once every file is fsynced (a killed export leaves only that hidden
    folder, which the next export to the same place removes). Missing folders above it are made
    only then, and removed again if the export fails."""
    from ..cache.store import open_cache

    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    output = Path(output)
    chosen = _check_request(cache, format, tap, splits)
    prepare_output_folder(output, "features/", "the export")
    library = _format_library(format)
    final = output.resolve() if output.is_symlink() else output  # a link to an empty folder: fill its target
    if os.path.ismount(final):  # the finished folder is renamed onto -o: a mount point cannot be replaced
        raise UsageError(f"{output} is a mount point, which the finished export cannot replace; give a new folder "
                         f"inside it (e.g. -o {Path(output) / 'features'})")
    with output_parents(final, "the export's folder"), atomic_folder(final, "the export", "export_rename") as tmp:
        _write_export(cache, tap, chosen, format, library, tmp)
    return output


def _check_request(cache: Cache, format: str, tap: str, splits: list[str] | None) -> list[str]:
    """The splits to write, once the format, the tap and the splits are known good."""
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
    return chosen


def _format_library(format: str):
    """The module the format writes with: pyarrow (its parquet imported), datasets, or None for npy."""
    if format == "parquet":
        try:
            import pyarrow
            import pyarrow.parquet  # noqa: F401 (pyarrow.parquet.write_table)
        except ImportError:
            raise UsageError("--format parquet needs pyarrow: pip install pyarrow") from None
        return pyarrow
    if format == "hf":
        try:
            import datasets
        except ImportError:
            raise UsageError('--format hf needs datasets: pip install "featurecache[hf]"') from None
        return datasets
    return None


def _write_export(cache: Cache, tap: str, chosen: list[str], format: str, library, folder: Path) -> None:
    """Every file of the export, into the (temporary) `folder`."""
    if format == "hf":
        _save_hf(library, cache, tap, chosen, folder)  # (dataset.json beside dataset_dict.json, all load_from_disk reads)
    for split in chosen if format != "hf" else []:
        arrays = cache.arrays(split, tap)
        if format == "npy":
            (folder / split).mkdir()
            for name, values in arrays.items():
                _save_npy(folder / split / f"{name}.npy", values)
        else:
            pa = library
            flat = arrays["features"].reshape(len(arrays["features"]), -1)
            features = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
            table = pa.table({"features": features, "label": arrays["labels"], "index": arrays["index"],
                              "path": arrays["paths"].tolist()})
            pa.parquet.write_table(table, str(folder / f"{split}.parquet"))
        fault_point("export_split")
    description = {**_describe(cache, tap), "format": format, "exported_splits": chosen}
    (folder / "dataset.json").write_text(json_text(description), encoding="utf-8")


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
