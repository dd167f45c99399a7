"""Check a cache entry end to end, and repair it by re-extracting only what is bad.

`verify_entry` reads everything a command reads: the manifest (through the schema:
types, values, paths inside the entry), each listed shard (present, non-empty, the
recorded size and SHA-256, its split and row count, the expected datasets, shapes and
dtypes, no links to other files, the features' XXH3 and the columns' fletcher32
checksums, labels inside the class list), files in `shards/` the manifest does not
list, the backbone checkpoint under `_weights/` (its tensors must hash to its name),
every head (record schema, checksum, tensors), every finetune run's outputs (and
whether it is finished: an unfinished run is not damage, but is reported apart), every
view set under `views/` (its sealed manifest, each view shard as a plain one, files
it does not list; cache/views.py), and temporary files left by killed writers
anywhere in the entry. It reports every problem, not the first.

`repair_entry` restores what can be recomputed: a missing or damaged checkpoint is
rewritten from the source weights (when they can still be had), temporary files are
deleted, bad shards are dropped from the manifest (atomically) with their files and
the entry's own `ExtractSpec` runs again: every good row is reused, only the rows of
the bad shards go through the backbone. HDF5's `h5clear` is never run: a damaged
shard is recomputed, never patched. A damaged head or finetune output cannot be
recomputed without refitting it; the report says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CacheIncompleteError, CorruptCacheError, FeatureCacheError, InvalidRecordError, MismatchError
from ..cache.atomic import abandoned, is_temporary, write_json_atomic
from ..cache.layout import (FINETUNE_DIR, FINETUNE_RECORD, FOLDERS_WITH_TEMPORARIES, HEAD_FILE, HEAD_JSON, HEADS_DIR,
                            MANIFEST, SHARDS_DIR, WEIGHTS_DIR, shard_file, weights_file)
from ..cache.integrity import read_safetensors, read_sealed_json
from ..cache.shards import features_layout, file_sha256, open_h5, read_rows
from ..cache.manifest import (drop_shards, listed_rows, manifest_seal_problem, read_manifest, tap_shapes,
                              write_manifest)
from ..cache.store import Cache, entry_dir_name, entry_id, entry_lock, resolve_entry

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
    invalid_records: list[str] = field(default_factory=list)  # malformed manifest or head records (exit code 2)
    checkpoint_bad: bool = False  # the backbone checkpoint is missing or damaged
    bad_view_shards: list[str] = field(default_factory=list)  # listed view shards to drop and recompute
    bad_view_sets: list[str] = field(default_factory=list)  # view set folders whose manifest is unreadable
    manifest_unsealed: bool = False  # the manifest's checksum is missing or wrong
    head_copies: dict[str, dict] = field(default_factory=dict)  # head.json files that differ: path -> sealed record
    unfinished_runs: list[str] = field(default_factory=list)  # finetune runs stopped or running: not damage, unusable
    shards_checked: int = 0
    rows_checked: int = 0
    artifacts_checked: int = 0  # checkpoint, heads, finetune outputs

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_shard(path: Path, record: dict, tap_shapes: dict, n_classes: int) -> str | None:
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
    try:  # every dataset's shape and dtype, the split, no links outside, and every checksum
        rows = read_rows(file, record["rows"], tap_shapes, split=record["split"])
    except FeatureCacheError as error:
        return str(error).split("; run featurecache verify")[0]
    if len(rows.labels) and (rows.labels.min() < -1 or rows.labels.max() >= n_classes):
        return f"labels run from {rows.labels.min()} to {rows.labels.max()}, but the manifest lists {n_classes} classes"
    if "features" in record and record["features"] != features_layout(file):
        return "the manifest's feature offsets or checksums differ from the shard's"
    return None


def _check_unlisted(file: Path, tap_shapes: dict) -> str:
    try:
        with open_h5(file) as handle:
            rows = int(handle.attrs["rows"])
        read_rows(file, rows, tap_shapes)
    except (OSError, KeyError, ValueError, FeatureCacheError):
        return "not in the manifest, and damaged"
    return "complete but not in the manifest (a run died before listing it; extract adopts it)"


def _check_checkpoint(report: VerifyReport, manifest: dict) -> None:
    from ..backbones.weights import read_checkpoint

    sha = manifest["weights"]["sha256"]
    report.artifacts_checked += 1
    try:
        read_checkpoint(report.path.parent / WEIGHTS_DIR, sha)
    except FeatureCacheError as error:
        what = str(error).split(";")[0].replace(f"the backbone checkpoint {report.path.parent / WEIGHTS_DIR}/{sha}"
                                                ".safetensors ", "")
        report.problems.append(Problem(manifest["weights"]["file"], f"the backbone checkpoint {what}"))
        report.checkpoint_bad = True


def _check_heads(report: VerifyReport, cache: Cache) -> None:
    from ..fit.headstore import load_head, read_record_with_checksum
    from ..cache.integrity import read_tensors, read_metadata

    folder = cache.path / HEADS_DIR
    for directory in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not directory.is_dir():
            continue
        relative = f"{HEADS_DIR}/{directory.name}/{HEAD_FILE}"
        file = directory / HEAD_FILE
        if not file.exists():
            if not any(is_temporary(p.name) for p in directory.iterdir()):
                report.problems.append(Problem(f"{HEADS_DIR}/{directory.name}", f"a head folder without {HEAD_FILE}"))
            continue
        report.artifacts_checked += 1
        try:
            record = read_record_with_checksum(cache, directory.name)[0]
            _check_head_copy(report, directory, record)
            metadata = read_metadata(file, "head file", "")
            read_tensors(file, metadata, "head file", "")
            load_head(cache, directory.name)  # shapes and values of the rebuilt head
        except MismatchError:
            pass  # fitted on other features, or a stale ensemble: out of date, not damaged (heads says so)
        except InvalidRecordError as error:
            report.problems.append(Problem(relative, str(error)))
            report.invalid_records.append(str(error))
        except FeatureCacheError as error:
            report.problems.append(Problem(relative, str(error).split(";")[0] + "; fit it again with --overwrite"))


def _check_head_copy(report: VerifyReport, directory: Path, record: dict) -> None:
    """head.json is a copy of the sealed record for people and tools: an edited or damaged
    copy is reported (and rewritten by --repair), since tools reading it would be misled."""
    copy = directory / HEAD_JSON
    try:
        text = json.dumps(json.loads(copy.read_text(encoding="utf-8")), sort_keys=True)
    except (OSError, ValueError):
        text = None
    same = text == json.dumps(record, sort_keys=True)
    if not same:
        relative = f"{HEADS_DIR}/{directory.name}/{HEAD_JSON}"
        report.problems.append(Problem(relative, "differs from the head's sealed record (edited or damaged); "
                                                 "verify --repair writes it again"))
        report.head_copies[relative] = record


def _check_finetune_runs(report: VerifyReport, cache: Cache) -> None:
    """Each run's outputs and record, checked; a sound run that has not done every epoch asked
    for (stopped, or still running) is not damage, but export refuses it: said, with its command."""
    from ..finetune.runs import read_finetune_record, unfinished

    folder = report.path / FINETUNE_DIR
    for directory in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not directory.is_dir():
            continue
        checks = [(file, lambda f: read_safetensors(f, "finetune output", ""))
                  for file in sorted(directory.glob("*.safetensors"))]
        if (directory / FINETUNE_RECORD).exists():
            checks.append((directory / FINETUNE_RECORD, lambda f: read_sealed_json(f, "finetune record", "")))
        for file, check in checks:
            report.artifacts_checked += 1
            try:
                check(file)
            except FeatureCacheError as error:
                report.problems.append(Problem(f"{FINETUNE_DIR}/{directory.name}/{file.name}",
                                               str(error).split(";")[0] + "; run featurecache finetune again "
                                               "with --restart"))
        try:
            warning = unfinished(cache, read_finetune_record(cache, directory.name))
        except CacheIncompleteError as error:  # no record yet: stopped before its first one, or running
            warning = str(error)
        except FeatureCacheError:
            continue  # a damaged record is reported above
        if warning:
            report.unfinished_runs.append(warning)


def _temporaries(report: VerifyReport) -> None:
    """Temporary files of killed writers, in every folder featurecache writes to. A running
    writer's (fit-head, finetune, another entry's extract into _weights/: the entry lock
    does not stop them) is not damage, and --repair must not delete it under its feet."""
    locked = [report.path, report.path / SHARDS_DIR]  # written only under the entry lock verify holds
    unlocked = [report.path / name for name in FOLDERS_WITH_TEMPORARIES if name not in (".", SHARDS_DIR)]
    unlocked += [p for parent in (HEADS_DIR, FINETUNE_DIR) if (report.path / parent).is_dir()
                 for p in sorted((report.path / parent).iterdir()) if p.is_dir()]
    for folder in [*locked, *unlocked, report.path.parent / WEIGHTS_DIR]:
        for file in sorted(folder.iterdir()) if folder.is_dir() else []:
            if is_temporary(file.name) and file.is_file() and (folder in locked or abandoned(file)):
                relative = Path(os.path.relpath(file, report.path)).as_posix()  # ../_weights/ for the checkpoints
                report.problems.append(Problem(relative, "temporary file left by an interrupted run"))
                report.stray_files.append(relative)


def verify_entry(name: str | Path, *, root: Path | None = None, lock_timeout: float = 10.0) -> VerifyReport:
    """Report every problem of a cache entry; reads every byte of every artifact."""
    path = resolve_entry(name, root)
    report = VerifyReport(path)
    with entry_lock(path, lock_timeout):  # a running extract's temp files are not damage
        try:
            manifest = read_manifest(path, check_seal=False)
        except FeatureCacheError as error:  # its advice to run verify is for the other commands
            report.problems.append(Problem(MANIFEST, str(error).removesuffix("; run featurecache verify")))
            report.manifest_readable = False
            if isinstance(error, InvalidRecordError):
                report.invalid_records.append(str(error))
            return report
        seal = manifest_seal_problem(manifest)
        if seal:
            report.problems.append(Problem(MANIFEST, seal))
            report.manifest_unsealed = True
        if not manifest.get("complete"):
            report.problems.append(Problem(MANIFEST, "extraction has not finished (rerun extract to resume)"))
        shapes = tap_shapes(manifest)
        listed = set()
        for record in manifest["shards"]:
            listed.add(record["file"])
            report.shards_checked += 1
            problem = _check_shard(path, record, shapes, len(manifest["classes"]))
            if problem:
                report.problems.append(Problem(record["file"], problem))
                report.bad_shards.append(record["file"])
            else:
                report.rows_checked += record["rows"]
        for split, count in manifest["splits"].items():
            rows = listed_rows(manifest, split)
            if rows != count:
                report.problems.append(Problem(MANIFEST, f"{split}: shards hold {rows} rows, the manifest says {count}"))
        for file in sorted(path.joinpath(SHARDS_DIR).iterdir()) if path.joinpath(SHARDS_DIR).is_dir() else []:
            relative = shard_file(file.name)
            if is_temporary(file.name):
                continue  # reported with every other folder's below
            if relative not in listed:
                what = _check_unlisted(file, shapes) if file.suffix == ".h5" else "unexpected file"
                report.problems.append(Problem(relative, what))
                if "damaged" in what or file.suffix != ".h5":
                    report.stray_files.append(relative)
        _temporaries(report)
        _check_checkpoint(report, manifest)
        cache = Cache(path, manifest)
        _check_heads(report, cache)
        _check_finetune_runs(report, cache)
        _check_views(report, shapes, len(manifest["classes"]))
    return report


def _check_views(report: VerifyReport, tap_shapes: dict, n_classes: int) -> None:
    """Every view set (cache/views.py): its manifest, each listed shard as thoroughly as a plain one, strays."""
    from ..cache.views import check_view_sets

    for relative, what, kind in check_view_sets(report.path, tap_shapes, n_classes, _check_shard):
        report.problems.append(Problem(relative, what))
        {"shard": report.bad_view_shards, "stray": report.stray_files,
         "set": report.bad_view_sets}[kind].append(relative if kind != "set" else relative.rsplit("/", 1)[0])


def _entry_spec(path: Path, manifest: dict):
    from ..extract.stage import ExtractSpec

    spec = dict(manifest["spec"])
    spec["taps"] = tuple(spec["taps"])
    spec["root"] = str(path.parent)  # the entry's own root, wherever it was made from
    spec["allow_layout"] = True  # the entry exists: its layout was accepted when it was made
    spec["unlabeled"] = tuple(spec.get("unlabeled") or ())
    known = {f.name for f in dataclasses.fields(ExtractSpec)}
    return ExtractSpec(**{k: v for k, v in spec.items() if k in known})


def restore_checkpoint(path: Path, manifest: dict) -> Path:
    """Rewrite `_weights/<sha>.safetensors` from the entry's source weights; a clear error when
    they cannot be had or no longer hash to the entry's weights."""
    from ..backbones.registry import get_backbone
    from ..backbones.weights import resolve_weights, store_weights

    spec = _entry_spec(path, manifest)
    sha = manifest["weights"]["sha256"]
    file = path.parent / WEIGHTS_DIR / weights_file(sha)
    try:
        resolved = resolve_weights(get_backbone(manifest["config"]["arch"]), spec.weights, seed=spec.seed)
    except FeatureCacheError as error:
        raise CorruptCacheError(
            f"the backbone checkpoint {file} is missing or damaged, and its source weights (--weights "
            f"{spec.weights}) cannot be loaded to rewrite it: {error}. Make them available and rerun "
            f"featurecache verify --repair, or delete {path} and extract again") from None
    if resolved.sha256 != sha:
        raise CorruptCacheError(
            f"the backbone checkpoint {file} is missing or damaged, and the source weights (--weights "
            f"{spec.weights}) have changed since the entry was made (sha256 {resolved.sha256[:12]}, the entry "
            f"was made with {sha[:12]}), so they cannot restore it; delete {path} and extract again")
    return store_weights(path.parent / WEIGHTS_DIR, manifest["config"]["arch"], resolved)


def _refuse_edited_settings(path: Path, manifest: dict) -> None:
    """An unsealed manifest is sealed again only where what it says can be checked: its
    config must still give the entry's id (its folder name), and its class list must be
    the one its heads were fitted with. Sealing an edited class list made every head
    predict swapped names; an edited config, a repair that re-extracted another entry."""
    from ..fit.headstore import list_heads, read_record

    if not path.name.endswith(entry_id(manifest["config"])[:12]):
        raise CorruptCacheError(
            f"the manifest of {path} was edited: its settings (config) no longer give the entry's id "
            f"{path.name[-12:]}, so --repair will not seal them; restore the manifest, or delete {path} and run "
            "featurecache extract again")
    _refuse_edited_spec(path, manifest)
    cache = Cache(path, manifest)
    for name in list_heads(cache):
        try:
            classes = read_record(cache, name)["classes"]
        except (FeatureCacheError, OSError):
            continue  # a damaged head is reported on its own
        if len(classes) == len(manifest["classes"]) and classes != manifest["classes"]:
            raise CorruptCacheError(
                f"the manifest of {path} was edited: its classes differ from those head "
                f"{name!r} was fitted with, so --repair will not seal them; restore the manifest "
                f"(the head records classes {classes[:5]}{'...' if len(classes) > 5 else ''}), or delete {path} "
                "and run featurecache extract again")


def _refuse_edited_spec(path: Path, manifest: dict) -> None:
    """The stored `spec` is what finetune's image path, the report and a repair reopen: it must
    still name this entry's source and folder. An edited source made them read another
    dataset under this entry's labels; an edited name, a repair write another entry."""
    from ..data.sources import reopen_source

    made, config = manifest["spec"], manifest["config"]
    advice = f"restore the manifest, or delete {path} and run featurecache extract again"
    try:
        identity = reopen_source(made).identity()
    except FeatureCacheError as error:
        raise CorruptCacheError(
            f"the manifest of {path} was edited, and the source its spec names ({made.get('source')}) cannot be "
            f"opened to check that it is this entry's ({' '.join(str(error).split())}), so --repair will not seal "
            f"it; {advice}") from None
    folder = entry_dir_name(made.get("name") or identity.get("name", ""), config["arch"], entry_id(config))
    if identity != config["source"] or folder != path.name:
        what = "source" if identity != config["source"] else "name"
        raise CorruptCacheError(
            f"the manifest of {path} was edited: the {what} its spec names ({made.get(what)}) is not this "
            f"entry's, so --repair will not seal it; {advice}")


def repair_entry(name: str | Path, *, root: Path | None = None, progress=None) -> tuple[VerifyReport, VerifyReport]:
    """Restore what can be recomputed; returns the reports before and after."""
    from ..extract.stage import extract

    before = verify_entry(name, root=root)
    path = before.path
    if before.ok:
        return before, before
    if not before.manifest_readable:
        first = before.problems[0].what
        error = InvalidRecordError if before.invalid_records else CorruptCacheError
        raise error(
            f"the manifest of {path} is unreadable or invalid ({first}), so there is no record of what to "
            f"recompute; delete {path} and run featurecache extract again")
    shards = path / SHARDS_DIR
    if (shards.exists() or shards.is_symlink()) and not shards.is_dir():  # before any write: nothing half-done
        raise CorruptCacheError(f"{shards} is not a folder, so --repair cannot write the shards into it; move it "
                                "away and run featurecache verify --repair again")
    manifest = read_manifest(path, check_seal=False)
    if before.manifest_unsealed:  # every shard was checked against it above; seal what is there again
        _refuse_edited_settings(path, manifest)
        with entry_lock(path, 10.0):
            write_manifest(path, manifest)
        log.warning("sealed %s again; its classes and settings are as found", path / MANIFEST)
    if before.checkpoint_bad:  # first: the shards' recomputation needs the same weights
        restore_checkpoint(path, manifest)
    shards_bad = bool(before.bad_shards) or any(
        p.file == MANIFEST or p.file.startswith(shard_file("")) for p in before.problems
        if p.file not in before.stray_files and not (p.file == MANIFEST and "checksum" in p.what))
    if shards_bad and str(manifest.get("spec", {}).get("source", "")).startswith("python:"):
        raise CorruptCacheError(
            f"{path} was extracted from a Python object, which --repair cannot reopen; delete {path} and run "
            "featurecache.extract(source=...) again with the same object")
    with entry_lock(path, 10.0):
        for relative in before.stray_files:
            (path / relative).unlink(missing_ok=True)
            log.info("removed %s", relative)
            folder = (path / relative).parent
            if folder.parent.name in (HEADS_DIR, FINETUNE_DIR) and folder.parent.parent == path:
                with contextlib.suppress(OSError):  # a killed first fit's folder, now empty
                    folder.rmdir()
        for relative, record in before.head_copies.items():
            write_json_atomic(path / relative, record, "the head's copy")
            log.info("wrote %s again from the head's sealed record", relative)
        if shards_bad:
            manifest = read_manifest(path)
            bad = set(before.bad_shards)
            drop_shards(manifest, bad)
            write_manifest(path, manifest)  # the commit marker first, then the files
            for relative in bad:
                (path / relative).unlink(missing_ok=True)
                log.info("removed %s", relative)
    if shards_bad:
        result = extract(_entry_spec(path, manifest), progress=progress)
        if result.path.resolve() != path.resolve():
            raise CorruptCacheError(
                f"re-extracting {path} gave another entry ({result.path}): the source or weights changed "
                "since it was made; run featurecache extract instead")
    _repair_views(path, before, progress)
    return before, verify_entry(path)


def _repair_views(path: Path, before: VerifyReport, progress) -> None:
    """Unreadable view sets are deleted; damaged view shards dropped and computed again (the
    views are deterministic, so the same bytes come back)."""
    import shutil

    from ..cache.views import drop_view_shards
    from ..extract.stage import extract

    with entry_lock(path, 10.0):
        for relative in before.bad_view_sets:
            shutil.rmtree(path / relative, ignore_errors=True)
            log.warning("removed the view set %s (its manifest is unreadable); extract --views makes it again",
                        relative)
        touched = drop_view_shards(path, before.bad_view_shards)
    manifest = read_manifest(path)
    for views in touched:
        if views["entry_key"] != manifest["key"]:
            continue  # a set for files the entry no longer has: dropped, not recomputed
        spec = dataclasses.replace(_entry_spec(path, manifest), views=views["views"], augment=views["augment"],
                                   view_seed=views["seed"])
        extract(spec, progress=progress)
