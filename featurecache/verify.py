"""Check a cache entry end to end, and repair it by re-extracting only what is bad.

`verify_entry` reads everything: the manifest (parses, stays inside the entry), each
listed shard (present, non-empty, the recorded size and SHA-256, the expected datasets,
shapes and dtypes, the features' XXH3 and the columns' fletcher32 checksums), files in `shards/` the manifest
does not list, and temporary files. It reports every problem, not the first.

`repair_entry` drops the bad shards from the manifest (atomically) and deletes their
files, then runs the entry's own `ExtractSpec` again: every good row is reused, only
the rows of the bad shards go through the backbone. HDF5's `h5clear` is never run: a
damaged shard is recomputed, never patched.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from .errors import CorruptCacheError, FeatureCacheError
from .shards import features_layout, file_sha256, read_rows
from .store import MANIFEST, entry_lock, read_manifest, resolve_entry, write_json_atomic

log = logging.getLogger("featurecache")


@dataclass
class Problem:
    file: str  # relative to the entry
    what: str

    def __str__(self) -> str:
        return f"{self.file}: {self.what}"


@dataclass
class VerifyReport:
    path: Path
    problems: list[Problem] = field(default_factory=list)
    bad_shards: list[str] = field(default_factory=list)  # listed shards to drop and recompute
    stray_files: list[str] = field(default_factory=list)  # unlisted or temporary files to delete
    manifest_readable: bool = True
    shards_checked: int = 0
    rows_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_shard(path: Path, record: dict, tap_shapes: dict) -> str | None:
    """What is wrong with one listed shard, or None."""
    file = path / record["file"]
    if not file.is_file():
        return "listed in the manifest but missing"
    size = file.stat().st_size
    if size == 0:
        return "zero-length file"
    if size != record["bytes"]:
        return f"truncated or resized: {size} bytes, the manifest says {record['bytes']}"
    if file_sha256(file) != record["sha256"]:
        return "checksum mismatch: SHA-256 differs from the manifest (flipped bytes)"
    try:  # every dataset's shape and dtype, and every checksum
        read_rows(file, record["rows"], tap_shapes)
    except FeatureCacheError as error:
        return str(error).split("; run featurecache verify")[0]
    if "features" in record and record["features"] != features_layout(file):
        return "the manifest's feature offsets or checksums differ from the shard's"
    return None


def _check_unlisted(file: Path, tap_shapes: dict) -> str:
    try:
        with h5py.File(file, "r") as handle:
            rows = int(handle.attrs["rows"])
        read_rows(file, rows, tap_shapes)
    except (OSError, KeyError, ValueError, FeatureCacheError):
        return "not in the manifest, and damaged"
    return "complete but not in the manifest (a run died before listing it; extract adopts it)"


def verify_entry(name: str | Path, *, root: Path | None = None, lock_timeout: float = 10.0) -> VerifyReport:
    """Report every problem of a cache entry; reads every byte of every shard."""
    path = resolve_entry(name, root)
    report = VerifyReport(path)
    with entry_lock(path, lock_timeout):  # a running extract's temp files are not damage
        try:
            manifest = read_manifest(path)
        except FeatureCacheError as error:
            report.problems.append(Problem(MANIFEST, str(error)))
            report.manifest_readable = False
            return report
        if not manifest.get("complete"):
            report.problems.append(Problem(MANIFEST, "extraction has not finished (rerun extract to resume)"))
        tap_shapes = {tap: tuple(info["shape"]) for tap, info in manifest["taps"].items()}
        listed = set()
        for record in manifest["shards"]:
            listed.add(record["file"])
            report.shards_checked += 1
            problem = _check_shard(path, record, tap_shapes)
            if problem:
                report.problems.append(Problem(record["file"], problem))
                report.bad_shards.append(record["file"])
            else:
                report.rows_checked += record["rows"]
        for split, count in manifest["splits"].items():
            listed_rows = sum(s["rows"] for s in manifest["shards"] if s["split"] == split)
            if listed_rows != count:
                report.problems.append(Problem(MANIFEST, f"{split}: shards hold {listed_rows} rows, the manifest says {count}"))
        for file in sorted(path.joinpath("shards").iterdir()) if path.joinpath("shards").is_dir() else []:
            relative = f"shards/{file.name}"
            if ".tmp-" in file.name:
                report.problems.append(Problem(relative, "temporary file left by an interrupted run"))
                report.stray_files.append(relative)
            elif relative not in listed:
                what = _check_unlisted(file, tap_shapes) if file.suffix == ".h5" else "unexpected file"
                report.problems.append(Problem(relative, what))
                if "damaged" in what or file.suffix != ".h5":
                    report.stray_files.append(relative)
        for file in sorted(path.glob(f".{MANIFEST}.tmp-*")):
            report.problems.append(Problem(file.name, "temporary file left by an interrupted run"))
            report.stray_files.append(file.name)
    return report


def repair_entry(name: str | Path, *, root: Path | None = None, progress=None) -> tuple[VerifyReport, VerifyReport]:
    """Drop bad shards, re-extract only their rows; returns the reports before and after."""
    from .extract import ExtractSpec, extract

    before = verify_entry(name, root=root)
    path = before.path
    if before.ok:
        return before, before
    if not before.manifest_readable:
        raise CorruptCacheError(
            f"the manifest of {path} is unreadable, so there is no record of what to recompute; "
            f"delete {path} and run featurecache extract again")
    if str(read_manifest(path).get("spec", {}).get("source", "")).startswith("python:"):
        raise CorruptCacheError(
            f"{path} was extracted from a Python object, which --repair cannot reopen; delete {path} and run "
            "featurecache.extract(source=...) again with the same object")
    with entry_lock(path, 10.0):
        manifest = read_manifest(path)
        bad = set(before.bad_shards)
        manifest["shards"] = [s for s in manifest["shards"] if s["file"] not in bad]
        manifest["complete"] = False
        write_json_atomic(path / MANIFEST, manifest)  # the commit marker first, then the files
        for relative in [*bad, *before.stray_files]:
            (path / relative).unlink(missing_ok=True)
            log.info("removed %s", relative)
    spec = dict(manifest["spec"])
    spec["taps"] = tuple(spec["taps"])
    spec["root"] = str(path.parent)  # the entry's own root, wherever it was made from
    spec["allow_layout"] = True  # the entry exists: its layout was accepted when it was made
    spec["unlabeled"] = tuple(spec.get("unlabeled") or ())
    known = {f.name for f in dataclasses.fields(ExtractSpec)}
    result = extract(ExtractSpec(**{k: v for k, v in spec.items() if k in known}), progress=progress)
    if result.path.resolve() != path.resolve():
        raise CorruptCacheError(
            f"re-extracting {path} gave another entry ({result.path}): the source or weights changed "
            "since it was made; run featurecache extract instead")
    return before, verify_entry(path)
