"""The cache format: keys, the manifest, entry paths, and reading an entry back.

An entry lives in `<root>/<source>-<arch>-<id12>/`. Its id hashes everything that
changes the numbers except the file list (format version, architecture, SHA-256 of
the weights, taps, preprocessing, storage dtype, precision, source identity), so a
dataset that gains or loses files keeps its entry and is updated incrementally. The
entry's `key` adds every file's fingerprint: same key means nothing to compute, and
heads remember the key they were trained on.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path


from .._lazy import lazy_module
from ..errors import CacheIncompleteError, CacheLockedError, CacheNotFoundError, CorruptCacheError
from .manifest import (FORMAT_VERSION, fingerprint_kind, listed_rows,  # noqa: F401 (also imported here)
                       manifest_seal_problem, read_manifest, shard_records, tap_shapes, write_manifest)
from .layout import LOCK, MANIFEST, WEIGHTS_DIR  # noqa: F401 (MANIFEST, WEIGHTS_DIR: also imported from here)
from .shards import RowReader, ShardRows, empty_like_file, open_shard, read_paths, read_rows, read_split_features

np = lazy_module("numpy", globals(), "np")  # imported on first use: `ls`, `info` and `heads` never need it

DEFAULT_ROOT_ENV = "FEATURECACHE_ROOT"
# errnos of file systems (some NFS, CIFS, FUSE mounts) that have no flock
_NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)

log = logging.getLogger("featurecache")


def default_root() -> Path:
    return Path(os.environ.get(DEFAULT_ROOT_ENV, "cache"))


def canonical_json(data: object) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def entry_id(config: dict) -> str:
    return sha256_text(canonical_json({"format_version": FORMAT_VERSION, **config}))


def content_key(entry: str, fingerprints: list[str]) -> str:
    digest = hashlib.sha256(entry.encode())
    for fingerprint in sorted(fingerprints):
        digest.update(fingerprint.encode())
    return digest.hexdigest()


def entry_dir_name(source_name: str, arch: str, entry: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in source_name)[:40] or "source"
    arch = "".join(c if c.isalnum() or c in "-_." else "-" for c in arch)  # timm:NAME -> timm-NAME
    return f"{safe}-{arch}-{entry[:12]}"


@contextlib.contextmanager
def entry_lock(entry_path: Path, timeout: float) -> Iterator[None]:
    """Hold the entry's lock: one writer (extract, verify --repair) per entry at a time.

    An flock on `<entry>/.lock`: the kernel releases it when its holder dies, so a
    SIGKILLed run never blocks the next one; the file itself stays, harmlessly. Where
    the file system has no flock, a soft lock (`.lock.soft`, holding the owner's pid)
    replaces it; filelock breaks one whose owner is no longer alive on this host.
    """
    from filelock import FileLock, SoftFileLock, Timeout  # here: it costs ~0.1 s to import

    lock: FileLock | SoftFileLock = FileLock(str(entry_path / LOCK), timeout=timeout)
    try:
        try:
            lock.acquire()
        except OSError as error:
            if error.errno not in _NO_FLOCK:
                raise
            log.warning("no flock on %s (%s); using a soft lock file", entry_path, error.strerror)
            lock = SoftFileLock(str(entry_path / f"{LOCK}.soft"), timeout=timeout)
            lock.acquire()
    except Timeout:
        raise CacheLockedError(
            f"another featurecache process is writing {entry_path} (waited {timeout:g}s for its lock); "
            f"wait for it to finish, then rerun") from None
    try:
        yield
    finally:
        lock.release()


def resolve_entry(name: str | Path, root: Path | None = None) -> Path:
    """A cache entry by path, by folder name under the root, or by a unique key prefix."""
    path = Path(name).expanduser()
    if (path / MANIFEST).exists():
        return path
    root = root or default_root()
    if (root / str(name) / MANIFEST).exists():
        return root / str(name)
    matches = [e for e in list_entries(root) if str(name) and (
        e.name.startswith(str(name)) or e.name.split("-")[-1].startswith(str(name)))]
    if len(matches) == 1:
        return matches[0]
    hint = "" if not matches else f" ({len(matches)} entries match; be more specific)"
    raise CacheNotFoundError(f"no cache entry {name}{hint}; run featurecache ls to see entries, or extract first")


def list_entries(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MANIFEST).exists())


def entry_size_bytes(entry_path: Path) -> int:
    return sum(f.stat().st_size for f in entry_path.rglob("*") if f.is_file())


class Cache:
    """A finished cache entry: features, labels and paths per split and tap.

    `features(split, tap)` loads a whole split into memory; `iter_shards` streams it
    shard by shard and `row_reader` reads any rows, for data larger than memory.
    """

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path, self.manifest = path, manifest
        self.key: str = manifest["key"]
        self.classes: list[str] = manifest["classes"]
        self.tap_shapes = tap_shapes(manifest)

    @property
    def splits(self) -> dict[str, int]:
        """Rows per split, labelled or not."""
        return dict(self.manifest["splits"])

    @property
    def unlabeled_splits(self) -> list[str]:
        """Splits whose rows have no label (label -1): cached to predict on, never fitted or scored."""
        return list(self.manifest.get("unlabeled_splits", []))

    @property
    def labeled_splits(self) -> dict[str, int]:
        """Rows per split of the splits with labels: what heads are fitted and scored on."""
        unlabeled = set(self.unlabeled_splits)
        return {split: n for split, n in self.manifest["splits"].items() if split not in unlabeled}

    def arrays(self, split: str, tap: str = "pool") -> dict[str, np.ndarray]:
        """One split as numpy arrays: `features` (N, *tap shape), `labels` (int64, -1 for an
        unlabeled split), `index` (int64) and `paths` (str), rows in the same order."""
        return {"features": self.features(split, tap), "labels": self.labels(split), "index": self.index(split),
                "paths": np.asarray(self.paths(split), dtype=str)}

    @property
    def taps(self) -> list[str]:
        return list(self.tap_shapes)

    def _shards(self, split: str) -> list[dict]:
        if split not in self.manifest["splits"]:
            raise CacheNotFoundError(f"split {split!r} is not in {self.path.name}; it has: {', '.join(self.splits)}")
        return shard_records(self.manifest, split)

    def _check_tap(self, tap: str) -> None:
        if tap not in self.tap_shapes:
            raise CacheNotFoundError(
                f"tap {tap!r} is not in {self.path.name} (it has {', '.join(self.taps)}); "
                f"rerun featurecache extract with --tap {tap}")

    def iter_shards(self, split: str, tap: str = "pool") -> Iterator[ShardRows]:
        """Yield each shard's rows (features of one tap, labels, index, paths)."""
        self._check_tap(tap)
        for shard in self._shards(split):
            rows = read_rows(self.path / shard["file"], shard["rows"], {tap: self.tap_shapes[tap]}, split=split)
            self._check_labels(rows.labels, split)
            yield rows

    def features(self, split: str, tap: str = "pool") -> np.ndarray:
        """All features of a split, read straight into one preallocated array."""
        self._check_tap(tap)
        shards = self._shards(split)
        located = [(s.get("features") or {}).get(tap) for s in shards]
        offset = next((int(where["offset"]) for where in located if where), 0)  # shards share their layout
        out = empty_like_file((sum(s["rows"] for s in shards), *self.tap_shapes[tap]), self.manifest["dtype"], offset)
        read_split_features([(self.path / s["file"], s["rows"], s) for s in shards], tap, self.tap_shapes[tap], out)
        return out

    def row_reader(self, split: str, tap: str = "pool") -> RowReader:
        """Random access to a split's rows (checked once, then read where they lie): for
        minibatches in any order without loading the split."""
        self._check_tap(tap)
        shards = self._shards(split)
        return RowReader([(self.path / s["file"], s["rows"], s) for s in shards], tap, self.tap_shapes[tap],
                         self.manifest["dtype"])

    def _column(self, split: str, name: str) -> list:
        """One column of every shard of a split, in row order: a list per shard."""
        parts: list = []
        for shard in self._shards(split):
            path = self.path / shard["file"]
            try:
                with open_shard(path, shard["rows"], {}, shard["split"]) as handle:
                    parts.append(read_paths(handle[name], path) if name == "paths" else handle[name][:])
            except OSError as error:  # a fletcher32 mismatch
                raise CorruptCacheError(f"shard {path} is damaged ({error}); run featurecache verify") from None
        return parts

    def _integer_column(self, split: str, name: str) -> np.ndarray:
        # one concatenation: a list extended by NumPy scalars cost a Python step per row
        return np.concatenate([np.asarray(part, dtype=np.int64) for part in self._column(split, name)] or
                              [np.zeros(0, np.int64)])

    def labels(self, split: str) -> np.ndarray:
        """Class indices 0..C-1 of a split's rows (-1 marks a row without a label)."""
        return self._check_labels(self._integer_column(split, "labels"), split)

    def _check_labels(self, labels: np.ndarray, split: str) -> np.ndarray:
        if labels.size and (labels.min() < -1 or labels.max() >= len(self.classes)):
            raise CorruptCacheError(
                f"the {split} labels of {self.path} run from {labels.min()} to {labels.max()}, but the manifest "
                f"lists {len(self.classes)} classes; run featurecache verify")
        return labels

    def index(self, split: str) -> np.ndarray:
        return self._integer_column(split, "index")

    def paths(self, split: str) -> list[str]:
        return [path for part in self._column(split, "paths") for path in part]

    def fingerprints(self, split: str) -> list[str]:
        """Each row's file fingerprint (see `fingerprint_kind`): equal fingerprints, the same file."""
        return [f.decode("ascii") if isinstance(f, bytes) else f for part in self._column(split, "fingerprints")
                for f in part]

    @property
    def fingerprint_kind(self) -> str:
        return fingerprint_kind(self.manifest)

    def __repr__(self) -> str:
        return f"Cache({self.path}, splits={self.splits}, taps={self.taps})"


def shard_size_problem(entry_path: Path, manifest: dict) -> tuple[str, str] | None:
    """The first listed shard that is missing or not its recorded size, and what is wrong with it; None
    when every shard is there. One stat per shard (checksums are `verify`'s job)."""
    for shard in manifest["shards"]:
        file = entry_path / shard["file"]
        if not file.is_file():
            return shard["file"], "is missing"
        if file.stat().st_size != shard["bytes"]:
            return shard["file"], "has the wrong size"
    return None


def open_cache(path: str | Path, *, root: Path | None = None) -> Cache:
    """Open a finished entry; damage (missing or resized shards) is reported, not hidden."""
    entry_path = resolve_entry(path, root)
    manifest = read_manifest(entry_path)
    if not manifest.get("complete"):
        raise CacheIncompleteError(f"extraction of {entry_path} has not finished; rerun the same featurecache extract to resume")
    problem = shard_size_problem(entry_path, manifest)
    if problem:
        raise CorruptCacheError(f"shard {problem[0]} of {entry_path} {problem[1]}; run featurecache verify --repair")
    for split, count in manifest["splits"].items():
        if listed_rows(manifest, split) != count:
            raise CorruptCacheError(f"the shards of {entry_path} do not add up to its {count} {split} rows; "
                                    "run featurecache verify --repair")
    return Cache(entry_path, manifest)
