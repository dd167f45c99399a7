"""HDF5 shards: one file per (split, block of rows), complete or absent.

A shard is written under a process-unique temporary name, closed, fsynced and only
then renamed to `shards/<split>-NNNNN.h5`; a SIGKILLed HDF5 writer usually leaves an
unreadable file, so nothing is ever written in place. Datasets:
`features/<tap>` (N x ...), `labels` (int64), `index` (int64), `paths` (UTF-8),
`fingerprints` (ASCII, the source fingerprint of each row). Chunks carry fletcher32
checksums so flipped bytes fail on read.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .errors import CorruptCacheError
from .faults import fault_point

CHUNK_BYTES = 1 << 20  # about 1 MiB per chunk: large enough to read fast, small enough to append
FINGERPRINT_DTYPE = "S32"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.h5"


def shard_number(name: str) -> int:
    return int(Path(name).stem.rsplit("-", 1)[1])


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass
class ShardRows:
    """Rows of one shard, in memory."""

    features: dict[str, np.ndarray]
    labels: np.ndarray
    index: np.ndarray
    paths: list[str]
    fingerprints: list[str]

    def __len__(self) -> int:
        return len(self.labels)


class ShardWriter:
    """Append rows to a temporary shard file; `commit()` makes it final atomically."""

    def __init__(self, final_path: Path, *, tap_shapes: dict[str, tuple[int, ...]], dtype: str,
                 attrs: dict[str, str], compression: str | None = None) -> None:
        self.final_path = final_path
        self.tmp_path = final_path.with_name(f".{final_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.rows = 0
        self.file = h5py.File(self.tmp_path, "w")
        for key, value in attrs.items():
            self.file.attrs[key] = value
        item_bytes = np.dtype(dtype).itemsize
        for tap, shape in tap_shapes.items():
            chunk_rows = max(1, CHUNK_BYTES // (item_bytes * int(np.prod(shape))))
            self.file.create_dataset(f"features/{tap}", shape=(0, *shape), maxshape=(None, *shape),
                                     dtype=dtype, chunks=(chunk_rows, *shape), fletcher32=True,
                                     compression=compression)
        for name, dt in (("labels", "int64"), ("index", "int64"), ("paths", h5py.string_dtype()),
                         ("fingerprints", FINGERPRINT_DTYPE)):
            # HDF5 filters cannot apply to variable-length strings, so `paths` has no checksum.
            self.file.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,),
                                     fletcher32=name != "paths")
        fault_point("shard_open")

    def append(self, rows: ShardRows) -> None:
        n = len(rows)
        if n == 0:
            return
        start, stop = self.rows, self.rows + n
        for tap, values in rows.features.items():
            dataset = self.file[f"features/{tap}"]
            dataset.resize(stop, axis=0)
            dataset[start:stop] = values
        for name, values in (("labels", rows.labels), ("index", rows.index), ("paths", rows.paths),
                             ("fingerprints", [f.encode("ascii") for f in rows.fingerprints])):
            self.file[name].resize(stop, axis=0)
            self.file[name][start:stop] = values
        self.rows = stop
        fault_point("after_append")

    def commit(self) -> dict:
        """Close, fsync, rename into place; return the manifest record of the shard."""
        self.file.attrs["rows"] = self.rows
        self.file.close()
        with open(self.tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        record = {"rows": self.rows, "sha256": file_sha256(self.tmp_path), "bytes": self.tmp_path.stat().st_size}
        fault_point("before_rename")
        os.replace(self.tmp_path, self.final_path)
        fsync_directory(self.final_path.parent)
        fault_point("after_rename")
        return record

    def abort(self) -> None:
        """Drop the temporary file; the final path is never touched."""
        try:
            self.file.close()
        except Exception:  # already closed or broken by the failure being handled
            pass
        self.tmp_path.unlink(missing_ok=True)


def _check_dataset(handle: h5py.File, name: str, shape: Sequence[int], kind: str, path: Path) -> h5py.Dataset:
    dataset = handle.get(name)
    if not isinstance(dataset, h5py.Dataset):
        raise CorruptCacheError(f"shard {path} has no dataset {name!r}; run featurecache verify")
    if tuple(dataset.shape[1:]) != tuple(shape[1:]) or (shape[0] >= 0 and dataset.shape[0] != shape[0]):
        raise CorruptCacheError(
            f"shard {path}: {name} has shape {dataset.shape}, expected {tuple(shape)}; run featurecache verify")
    if dataset.dtype.kind not in kind:
        raise CorruptCacheError(f"shard {path}: {name} has dtype {dataset.dtype}; run featurecache verify")
    return dataset


def open_shard(path: Path, rows: int, tap_shapes: dict[str, tuple[int, ...]]) -> h5py.File:
    """Open a shard read-only and check every dataset's shape and dtype."""
    try:
        handle = h5py.File(path, "r")
    except (OSError, ValueError) as error:
        raise CorruptCacheError(f"cannot open shard {path} ({error}); run featurecache verify") from None
    try:
        for tap, shape in tap_shapes.items():
            _check_dataset(handle, f"features/{tap}", (rows, *shape), "f", path)
        _check_dataset(handle, "labels", (rows,), "iu", path)
        _check_dataset(handle, "index", (rows,), "iu", path)
        _check_dataset(handle, "paths", (rows,), "OSU", path)
        _check_dataset(handle, "fingerprints", (rows,), "S", path)
    except BaseException:
        handle.close()
        raise
    return handle


def read_rows(path: Path, rows: int, tap_shapes: dict[str, tuple[int, ...]],
              selection: np.ndarray | None = None) -> ShardRows:
    """Read a whole shard (or the rows where `selection` is True) into memory."""
    try:
        with open_shard(path, rows, tap_shapes) as handle:
            pick = slice(None) if selection is None else np.flatnonzero(selection)
            return ShardRows(
                features={tap: handle[f"features/{tap}"][pick] for tap in tap_shapes},
                labels=handle["labels"][pick], index=handle["index"][pick],
                paths=[p.decode() if isinstance(p, bytes) else p for p in handle["paths"][pick]],
                fingerprints=[f.decode("ascii") for f in handle["fingerprints"][pick]],
            )
    except OSError as error:  # fletcher32 mismatch or truncated data surfaces here
        raise CorruptCacheError(f"shard {path} is damaged ({error}); run featurecache verify") from None


def read_fingerprints(path: Path) -> list[str]:
    try:
        with h5py.File(path, "r") as handle:
            return [f.decode("ascii") for f in handle["fingerprints"][:]]
    except (OSError, KeyError, ValueError) as error:
        raise CorruptCacheError(f"shard {path} is damaged ({error}); run featurecache verify") from None
