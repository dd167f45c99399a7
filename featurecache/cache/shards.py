"""HDF5 shards: one file per (split, block of rows), complete or absent.

A shard is written under a process-unique temporary name, closed, fsynced and only
then renamed to `shards/<split>-NNNNN.h5`; a SIGKILLed HDF5 writer usually leaves an
unreadable file, so nothing is ever written in place. Datasets:
`features/<tap>` (N x ...), `labels` (int64), `index` (int64), `paths` (UTF-8),
`fingerprints` (ASCII, the source fingerprint of each row).

Features are stored contiguous and uncompressed, the layout HDF5 reads fastest (at
`np.load` speed; chunking alone halves it, fletcher32 quarters it), and each features
dataset carries an XXH3 checksum of its bytes (`checksum` attribute), checked on every
whole read at ~20 GB/s. The small columns are chunked with fletcher32 checksums
(`paths`, a variable-length string, cannot carry a filter: it carries an XXH3 checksum
attribute of its own, checked on every read). With `--compression` the features are chunked and carry fletcher32
too. Either way, flipped bytes fail on read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .._lazy import lazy_module
from ..errors import CorruptCacheError
from ..faults import fault_point
from .atomic import fsync_file, publish, temporary_path

# Imported on first use: `ls`, `info` and `heads` never need them (tests/test_cli.py).
h5py = lazy_module("h5py", globals())
np = lazy_module("numpy", globals(), "np")

CHUNK_BYTES = 1 << 20  # about 1 MiB per chunk: large enough to read fast, small enough to append
FINGERPRINT_DTYPE = "S32"
CHECKSUM_ATTR = "checksum"  # on contiguous features datasets: "xxh3_64:<hex>" of the stored bytes
PAGE_BYTES = 4096
READ_BLOCK_BYTES = 1 << 20  # a pread and its hash while the block is still in cache


def features_checksum(values: np.ndarray) -> str:
    """The checksum stored with contiguous features: XXH3-64 of the array's bytes."""
    return "xxh3_64:" + xxhash.xxh3_64_hexdigest(np.ascontiguousarray(values).data)


def empty_like_file(shape: Sequence[int], dtype, file_offset: int) -> np.ndarray:
    """`np.empty(shape, dtype)` whose data starts at the same offset within a page as
    `file_offset`, so that a pread from there copies page onto page.

    Why: on this AMD EPYC the kernel's copy from the page cache ran 2.2x slower into a
    destination whose offset in its page differed from the source's (file offset 0, as
    HDF5 places contiguous data at 8192, into NumPy's arrays, which start 16 bytes into
    a page): 91 against 42 ms for 123 MB, measured. `np.load` reads from offset 128,
    which happens to be a fast pair. The array is a view of a buffer one page larger."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + PAGE_BYTES, np.uint8)
    shift = (file_offset - raw.ctypes.data) % PAGE_BYTES
    if shift % dtype.itemsize:  # an odd offset: an aligned array matters more
        return np.empty(shape, dtype)
    return raw[shift : shift + nbytes].view(dtype).reshape(shape)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.h5"


def shard_number(name: str) -> int:
    return int(Path(name).stem.rsplit("-", 1)[1])


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
                 attrs: dict[str, str], capacity: int, compression: str | None = None) -> None:
        """`capacity`: the most rows the shard will get (contiguous datasets cannot grow)."""
        self.final_path = final_path
        self.tmp_path = temporary_path(final_path)
        self.rows, self.capacity, self.dtype = 0, capacity, np.dtype(dtype)
        self.file = h5py.File(self.tmp_path, "w")
        for key, value in attrs.items():
            self.file.attrs[key] = value
        self._hashers: dict[str, xxhash.xxh3_64] = {}  # taps stored contiguous, and their running checksum
        self._paths_hasher = xxhash.xxh3_64()  # `paths` cannot carry fletcher32: its own checksum
        for tap, shape in tap_shapes.items():
            if compression is None:
                self.file.create_dataset(f"features/{tap}", shape=(capacity, *shape), dtype=dtype)
                self._hashers[tap] = xxhash.xxh3_64()
            else:
                chunk_rows = max(1, CHUNK_BYTES // (self.dtype.itemsize * int(np.prod(shape))))
                self.file.create_dataset(f"features/{tap}", shape=(0, *shape), maxshape=(None, *shape),
                                         dtype=dtype, chunks=(chunk_rows, *shape), fletcher32=True,
                                         compression=compression)
        for name, dt in (("labels", "int64"), ("index", "int64"), ("paths", h5py.string_dtype()),
                         ("fingerprints", FINGERPRINT_DTYPE)):
            # HDF5 filters cannot apply to variable-length strings: `paths` gets a checksum attribute.
            self.file.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,),
                                     fletcher32=name != "paths")
        fault_point("shard_open")

    def append(self, rows: ShardRows) -> None:
        n = len(rows)
        if n == 0:
            return
        start, stop = self.rows, self.rows + n
        if stop > self.capacity:
            raise ValueError(f"{stop} rows exceed the shard's capacity of {self.capacity}")
        for tap, values in rows.features.items():
            dataset = self.file[f"features/{tap}"]
            stored = np.ascontiguousarray(values, dtype=self.dtype)
            if tap in self._hashers:
                self._hashers[tap].update(stored.data)
            else:
                dataset.resize(stop, axis=0)
            dataset[start:stop] = stored
        self._paths_hasher.update(_paths_bytes(rows.paths))
        for name, values in (("labels", rows.labels), ("index", rows.index), ("paths", rows.paths),
                             ("fingerprints", [f.encode("ascii") for f in rows.fingerprints])):
            self.file[name].resize(stop, axis=0)
            self.file[name][start:stop] = values
        self.rows = stop
        fault_point("after_append")

    def commit(self) -> dict:
        """Close, fsync, rename into place; return the manifest record of the shard."""
        for tap, hasher in self._hashers.items():
            name = f"features/{tap}"
            if self.rows < self.capacity:  # images failed: keep exactly the rows written
                self._shrink(name)
            self.file[name].attrs[CHECKSUM_ATTR] = "xxh3_64:" + hasher.hexdigest()
        self.file["paths"].attrs[CHECKSUM_ATTR] = "xxh3_64:" + self._paths_hasher.hexdigest()
        self.file.attrs["rows"] = self.rows
        self.file.close()
        fsync_file(self.tmp_path)
        record = {"rows": self.rows, "sha256": file_sha256(self.tmp_path), "bytes": self.tmp_path.stat().st_size}
        if layout := features_layout(self.tmp_path):
            record["features"] = layout
        publish(self.tmp_path, self.final_path, fault="before_rename")
        fault_point("after_rename")
        return record

    def _shrink(self, name: str) -> None:
        """Replace a contiguous dataset by its first `rows` rows, copied in ~64 MiB blocks."""
        old = self.file[name]
        exact = self.file.create_dataset(f"{name}.exact", shape=(self.rows, *old.shape[1:]), dtype=old.dtype)
        step = max(1, (64 << 20) // max(1, old.dtype.itemsize * int(np.prod(old.shape[1:]))))
        for start in range(0, self.rows, step):
            exact[start : start + step] = old[start : min(start + step, self.rows)]
        del self.file[name]
        self.file.move(f"{name}.exact", name)

    def abort(self) -> None:
        """Drop the temporary file; the final path is never touched."""
        try:
            self.file.close()
        except Exception:  # already closed or broken by the failure being handled
            pass
        self.tmp_path.unlink(missing_ok=True)


def open_h5(path: Path) -> h5py.File:
    """Open an HDF5 file read-only, refusing anything that would read outside it.

    Shards hold only hard links to plain datasets. An external link, a soft link, a
    virtual dataset or a dataset with external raw storage would make a read return
    bytes of another file that the shard's SHA-256 does not cover, so each is refused.
    """
    handle = h5py.File(path, "r")
    try:
        names: list[str] = []
        handle.visit_links(names.append)
        for name in names:
            link = handle.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                raise CorruptCacheError(f"shard {path} holds an {type(link).__name__} at {name!r}, which reads "
                                        "another file; refused. Run featurecache verify --repair")
            item = handle.get(name)
            if isinstance(item, h5py.Dataset) and (item.is_virtual or item.external):
                kind = "virtual dataset" if item.is_virtual else "dataset stored in another file"
                raise CorruptCacheError(f"shard {path} holds a {kind} at {name!r}; refused. "
                                        "Run featurecache verify --repair")
    except BaseException:
        handle.close()
        raise
    return handle


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


def open_shard(path: Path, rows: int, tap_shapes: dict[str, tuple[int, ...]], split: str | None = None) -> h5py.File:
    """Open a shard read-only and check every dataset's shape and dtype (and its split, when given)."""
    try:
        handle = open_h5(path)
    except (OSError, ValueError) as error:
        raise CorruptCacheError(f"cannot open shard {path} ({error}); run featurecache verify") from None
    try:
        if split is not None and handle.attrs.get("split") != split:
            raise CorruptCacheError(f"shard {path} holds split {handle.attrs.get('split')!r}, the manifest says "
                                    f"{split!r}; run featurecache verify")
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


def _paths_bytes(paths: Sequence[str | bytes]) -> bytes:
    return b"".join((p if isinstance(p, bytes) else p.encode()) + b"\0" for p in paths)


def read_paths(dataset: h5py.Dataset, path: Path) -> list[str]:
    """All paths of a shard, checked against its `paths` checksum (shards written before it
    had one are covered only by the manifest's SHA-256, which verify checks)."""
    values = dataset[:]
    expected = dataset.attrs.get(CHECKSUM_ATTR)
    if expected is not None and "xxh3_64:" + xxhash.xxh3_64(_paths_bytes(values)).hexdigest() != expected:
        raise CorruptCacheError(f"shard {path} is damaged (paths fails its checksum); run featurecache verify")
    return [p.decode() if isinstance(p, bytes) else p for p in values]


def check_features(dataset: h5py.Dataset, values: np.ndarray, path: Path) -> None:
    """Compare all rows of a contiguous features dataset, read into `values`, with its checksum."""
    expected = dataset.attrs.get(CHECKSUM_ATTR)
    if expected is not None and features_checksum(values) != expected:
        raise CorruptCacheError(f"shard {path} is damaged ({dataset.name} fails its checksum); "
                                "run featurecache verify")


def read_features(dataset: h5py.Dataset, path: Path, out: np.ndarray | None = None) -> np.ndarray:
    """All rows of a features dataset, checked: into `out` when given (same shape and dtype)."""
    if out is None:
        out = np.empty(dataset.shape, dtype=dataset.dtype)
    if len(out):
        dataset.read_direct(out)
    check_features(dataset, out, path)
    return out


def features_layout(path: Path) -> dict[str, dict]:
    """Where each contiguous, checksummed features dataset of a shard lies:
    {tap: {"offset": byte offset in the file, "checksum": "xxh3_64:..."}}; listed in the manifest."""
    layout = {}
    with open_h5(path) as handle:
        for tap, dataset in handle.get("features", {}).items():
            offset = dataset.id.get_offset() if dataset.chunks is None else None
            checksum = dataset.attrs.get(CHECKSUM_ATTR)
            if offset is not None and checksum is not None:
                layout[tap] = {"offset": int(offset), "checksum": str(checksum)}
    return layout


def read_split_features(shards: Sequence[tuple[Path, int, dict]], tap: str, shape: Sequence[int],
                        out: np.ndarray) -> None:
    """Fill `out` with the `tap` features of each (shard, rows, manifest record), in order, all checked.

    Where the record gives the dataset's byte offset and checksum, the bytes are copied
    with `pread` straight into `out` (what `np.load` does; two shards in flight, since
    the copy releases the GIL) and checked against the checksum, which also proves the
    offset, shape and dtype right. Other shards (compressed, adopted or written by an
    older version) are read through h5py, with their own checks.
    """
    start, in_flight = 0, []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for path, rows, record in shards:
            view, start = out[start : start + rows], start + rows
            located = (record.get("features") or {}).get(tap)
            if rows == 0:
                continue
            if located is None or out.dtype.byteorder == ">":
                _read_with_h5py(path, rows, tap, shape, view)
            else:
                in_flight.append(pool.submit(_pread_checked, path, tap, located, view))
        for future in in_flight:
            future.result()


def _read_with_h5py(path: Path, rows: int, tap: str, shape: Sequence[int], out: np.ndarray) -> None:
    try:
        with open_h5(path) as handle:
            read_features(_check_dataset(handle, f"features/{tap}", (rows, *shape), "f", path), path, out)
    except (OSError, ValueError) as error:  # unreadable file, or a fletcher32 mismatch
        raise CorruptCacheError(f"shard {path} is damaged ({error}); run featurecache verify") from None


def _pread_checked(path: Path, tap: str, located: dict, view: np.ndarray) -> None:
    """Copy the bytes at the recorded offset into `view`; the checksum proves them right.

    Read and hashed block by block (READ_BLOCK_BYTES): each block is hashed while it is
    still in cache, so the bytes cross memory once, as in `np.load`; hashing the whole
    array after reading it cost a second pass (0.83x against 0.96x of np.load, measured
    with `view` placed by `empty_like_file`). Both release the GIL: the pool's two
    threads overlap."""
    buffer = memoryview(view).cast("B")
    hasher = xxhash.xxh3_64()
    try:
        with open(path, "rb", buffering=0) as handle:
            done = 0
            while done < len(buffer):
                block = buffer[done : done + READ_BLOCK_BYTES]
                count = os.preadv(handle.fileno(), [block], int(located["offset"]) + done)
                if count == 0:
                    raise CorruptCacheError(f"shard {path} is shorter than its manifest says; run featurecache verify")
                hasher.update(block[:count])
                done += count
    except OSError as error:
        raise CorruptCacheError(f"cannot read shard {path} ({error}); run featurecache verify") from None
    if "xxh3_64:" + hasher.hexdigest() != located["checksum"]:
        raise CorruptCacheError(f"shard {path} is damaged (features/{tap} fails its checksum); run featurecache verify")


class RowReader:
    """Any rows of one split's tap, read where they lie: minibatches over features larger
    than memory, in any order.

    Each shard's features are checked against their checksum once, when the reader is
    made (one shard in memory at a time). After that a row of a contiguous dataset is one
    `pread` at its offset; shards without a recorded offset (compressed, or written by an
    older version) are read through h5py.
    """

    def __init__(self, shards: Sequence[tuple[Path, int, dict]], tap: str, shape: Sequence[int], dtype) -> None:
        self.shards, self.tap, self.shape, self.dtype = list(shards), tap, tuple(shape), np.dtype(dtype)
        self.starts = np.cumsum([0] + [rows for _, rows, _ in self.shards])
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape))
        for path, rows, record in self.shards:
            if rows:
                offset = int(((record.get("features") or {}).get(tap) or {}).get("offset", 0))
                read_split_features([(path, rows, record)], tap, self.shape,
                                    empty_like_file((rows, *self.shape), self.dtype, offset))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """The rows at these positions of the split (distinct), in the order given."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"rows {positions.min()}..{positions.max()} are outside 0..{len(self) - 1}")
        out = np.empty((len(positions), *self.shape), self.dtype)
        owner = np.searchsorted(self.starts, positions, side="right") - 1
        for shard in np.unique(owner):
            picked = np.flatnonzero(owner == shard)
            local = positions[picked] - self.starts[shard]
            path, _, record = self.shards[shard]
            located = (record.get("features") or {}).get(self.tap)
            try:
                if located is None or self.dtype.byteorder == ">":
                    order = np.argsort(local)  # h5py reads increasing row lists only
                    with open_h5(path) as handle:
                        out[picked[order]] = handle[f"features/{self.tap}"][local[order]]
                else:
                    self._pread_rows(path, int(located["offset"]), local, out, picked)
            except (OSError, ValueError) as error:
                raise CorruptCacheError(f"cannot read shard {path} ({error}); run featurecache verify") from None
        return out

    def _pread_rows(self, path: Path, offset: int, local: np.ndarray, out: np.ndarray, picked: np.ndarray) -> None:
        with open(path, "rb", buffering=0) as handle:
            for target, row in zip(picked, local):
                if os.preadv(handle.fileno(), [memoryview(out[target]).cast("B")],
                             offset + int(row) * self.row_bytes) != self.row_bytes:
                    raise CorruptCacheError(f"shard {path} is shorter than its manifest says; run featurecache verify")


def read_rows(path: Path, rows: int, tap_shapes: dict[str, tuple[int, ...]],
              selection: np.ndarray | None = None, split: str | None = None) -> ShardRows:
    """Read a whole shard (or the rows where `selection` is True) into memory."""
    try:
        with open_shard(path, rows, tap_shapes, split) as handle:
            pick = slice(None) if selection is None else np.flatnonzero(selection)
            return ShardRows(
                features={tap: read_features(handle[f"features/{tap}"], path)[pick] for tap in tap_shapes},
                labels=handle["labels"][pick], index=handle["index"][pick],
                paths=np.asarray(read_paths(handle["paths"], path), dtype=object)[pick].tolist(),
                fingerprints=[f.decode("ascii") for f in handle["fingerprints"][pick]],
            )
    except OSError as error:  # a fletcher32 mismatch or truncated data surfaces here
        raise CorruptCacheError(f"shard {path} is damaged ({error}); run featurecache verify") from None


def read_fingerprints(path: Path) -> list[str]:
    try:
        with open_h5(path) as handle:
            return [f.decode("ascii") for f in handle["fingerprints"][:]]
    except (OSError, KeyError, ValueError) as error:
        raise CorruptCacheError(f"shard {path} is damaged ({error}); run featurecache verify") from None
