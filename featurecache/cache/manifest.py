"""The manifest: the only module that reads, builds, changes and writes `manifest.json`.

A manifest is the entry's commit marker (a shard it lists is complete). It is read
through the versioned schema (`cache/schema.py`, format `FORMAT_VERSION`) and its
checksum before any value is used, and every write is validated by the same schema
first, so no module can write a manifest that the next run would refuse. Modules that
extract or repair an entry change it only through the functions below; every other
module reads it (`Cache.manifest`, `read_manifest`).

On disk the format is unchanged since format 1: a JSON object, one key per line, sealed
with `checksum` (a SHA-256 of the rest, `cache/integrity.py`). A manifest of another
format version is refused with one line that names the version and says to extract again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import CacheNotFoundError, CorruptCacheError, InvalidRecordError
from .atomic import json_text, write_atomic
from .integrity import JSON_CHECKSUM, json_checksum, seal_json
from .layout import MANIFEST, WEIGHTS_DIR, weights_file

FORMAT_VERSION = 1


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ------------------------------------------------------------------ building and changing


def new_manifest(*, tool_version: str, entry_id: str, key: str, config: dict, weights_spec: str,
                 weights_description: str, weights_sha256: str, spec: dict, classes: list[str], dtype: str,
                 taps: dict[str, list[int]], created: str | None, unlabeled_splits: list[str], fingerprints: str,
                 class_ids: list[str] | None = None, copies: list[dict] = ()) -> dict:
    """The manifest of an extraction that has not written a shard yet (`created`: keep an earlier run's)."""
    manifest = {
        "format_version": FORMAT_VERSION, "tool_version": tool_version, "entry_id": entry_id, "key": key,
        "complete": False, "config": config,
        "weights": {"spec": weights_spec, "description": weights_description, "sha256": weights_sha256,
                    "file": f"../{WEIGHTS_DIR}/{weights_file(weights_sha256)}"},
        "spec": spec, "classes": classes, "dtype": dtype,
        "taps": {tap: {"shape": list(shape)} for tap, shape in taps.items()},
        "created": created or _now(),
        "shards": [], "skipped": [], "splits": {},
        # Rows of these splits carry label -1: cached, never fitted or scored (predict --split reads them).
        "unlabeled_splits": list(unlabeled_splits),
        "fingerprints": fingerprints,
        "copies": list(copies),  # byte-identical images across splits or classes (data/copies.py)
    }
    if class_ids:
        manifest["class_ids"] = list(class_ids)
    return manifest


def start_from(manifest: dict, shards: Iterable[dict], skipped: Iterable[dict]) -> None:
    """Begin with the shards and skipped files an earlier run left that are still valid."""
    manifest["shards"] = list(shards)
    manifest["skipped"] = list(skipped)


def add_shard(manifest: dict, record: dict, skipped: Iterable[dict]) -> None:
    """List a committed shard (and the files its images could not be read from)."""
    manifest["shards"].append(record)
    manifest["skipped"].extend(skipped)


def add_skipped(manifest: dict, skipped: Iterable[dict]) -> None:
    manifest["skipped"].extend(skipped)


def replace_part(manifest: dict, shard_files: set[str], fingerprints: set[str] | dict,
                 shards: list[dict], skipped: list[dict]) -> None:
    """Swap one part of the work (distributed ranks): the listed shards and skipped fingerprints go, the new ones come."""
    manifest["shards"] = [r for r in manifest["shards"] if r["file"] not in shard_files] + shards
    manifest["skipped"] = [s for s in manifest["skipped"] if s["fingerprint"] not in fingerprints] + skipped


def count_rows(manifest: dict, splits: Iterable[str]) -> None:
    """Set each split's row count from the listed shards, and the time of this update."""
    counts = {split: 0 for split in splits}
    for record in manifest["shards"]:
        counts[record["split"]] = counts.get(record["split"], 0) + record["rows"]
    manifest["splits"] = counts
    manifest["updated"] = _now()


def mark_complete(manifest: dict, order: Callable[[list[dict]], list[dict]]) -> None:
    """The extraction finished: shards in `order`, the entry complete."""
    manifest["shards"] = order(manifest["shards"])
    manifest["complete"] = True


def drop_shards(manifest: dict, files: set[str]) -> None:
    """Unlist damaged shards: the entry is incomplete until extract computes them again."""
    manifest["shards"] = [s for s in manifest["shards"] if s["file"] not in files]
    manifest["complete"] = False


def shard_records(manifest: dict, split: str | None = None) -> list[dict]:
    return [s for s in manifest["shards"] if split is None or s["split"] == split]


def listed_rows(manifest: dict, split: str) -> int:
    return sum(s["rows"] for s in manifest["shards"] if s["split"] == split)


def tap_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    return {tap: tuple(info["shape"]) for tap, info in manifest["taps"].items()}


def fingerprint_kind(manifest: dict) -> str:
    """How the entry's rows are fingerprinted: "stat" (path, size, mtime) or "content" (a hash of the bytes)."""
    return manifest.get("fingerprints") or manifest["config"].get("fingerprint", "stat")


# ------------------------------------------------------------------ reading and writing


def write_manifest(entry_path: Path, manifest: dict) -> None:
    """Write the manifest atomically, sealed with a checksum of its content, once the schema
    has validated exactly what the next reader will read (the JSON text, tuples become lists)."""
    from .schema import check_manifest  # pydantic: imported when a manifest is written, not at CLI start-up

    path = entry_path / MANIFEST
    text = json_text(seal_json(manifest))
    check_manifest(json.loads(text), path)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), "the manifest", fault="before_manifest_rename")


def manifest_seal_problem(manifest: dict) -> str | None:
    """What is wrong with the manifest's checksum, or None."""
    if JSON_CHECKSUM not in manifest:
        return "carries no checksum (written by an older featurecache, or edited)"
    if json_checksum(manifest) != manifest[JSON_CHECKSUM]:
        return "fails its checksum (edited or damaged after featurecache wrote it)"
    return None


def read_manifest(entry_path: Path, *, check_seal: bool = True) -> dict:
    """The entry's manifest, validated by the schema (cache/schema.py) and its checksum
    before any use (`check_seal=False`: verify, which reports a bad checksum with the rest)."""
    path = entry_path / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheNotFoundError(f"no cache entry at {entry_path} (no {MANIFEST}); run featurecache extract first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CorruptCacheError(f"manifest {path} is unreadable ({type(error).__name__}: {str(error)[:200]}); "
                                "run featurecache verify") from None
    if isinstance(manifest, dict) and manifest.get("format_version") not in (None, FORMAT_VERSION):
        raise InvalidRecordError(f"{path}: field format_version: {manifest.get('format_version')!r} is not "
                                 f"featurecache's format {FORMAT_VERSION}; extract the dataset again")
    from .schema import check_manifest  # pydantic: imported when a manifest is read, not at CLI start-up

    check_manifest(manifest, path)
    problem = manifest_seal_problem(manifest) if check_seal else None
    if problem:
        raise CorruptCacheError(f"manifest {path} {problem}; run featurecache verify, then featurecache verify "
                                "--repair to check its shards and seal it again")
    return manifest
