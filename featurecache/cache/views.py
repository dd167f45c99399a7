"""Augmented views of the training images: keyed view sets stored beside a cache entry.

A view set holds K augmented views (random resized crop and/or flip) of every train
row of the entry, computed once by `extract --views K --augment POLICY`:

    <entry>/views/<viewkey16>/manifest.json            sealed, validated like the entry's
    <entry>/views/<viewkey16>/shards/train-vVVVV-NNNNN.h5  view VVVV of the rows of block NNNNN

The view key hashes the entry's key (its plain features and every file's fingerprint),
the policy and its parameters, and the view seed, so adding views never touches the
plain shards, a different policy or seed is another set, and a set made for other
files is never read for these. The count K is not in the key: asking for more views
later computes only the new ones. Shards are written like the plain ones (temporary
name, fsync, rename; XXH3 of the features; SHA-256 in the manifest).

Only the train split gets views; val and test are read from the plain shards alone.
Pure Python here (no torch): `fit-head` and `verify` read view sets through it.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .._lazy import lazy_module
from ..errors import CorruptCacheError, FeatureCacheError, HeadError, UsageError
from .layout import MANIFEST, SHARDS_DIR, VIEWS_DIR, shard_file
from .store import canonical_json, sha256_text

np = lazy_module("numpy", globals(), "np")

POLICIES = ("crop-flip", "crop", "flip")
DEFAULT_SCALE = (0.25, 1.0)  # finetune's Augmentation default: RandomResizedCrop's area fraction
DEFAULT_RATIO = (3 / 4, 4 / 3)
SHARD_PATTERN = re.compile(rf"{SHARDS_DIR}/train-v([0-9]{{4}})-([0-9]{{5}})\.h5")


@dataclass(frozen=True)
class ViewPolicy:
    """The augmentation of a view set; the names follow finetune's `Augmentation` (scale, hflip)."""

    name: str  # crop-flip | crop | flip
    scale: tuple[float, float] | None  # area fraction of the random resized crop; None: the plain centre crop
    ratio: tuple[float, float] | None
    hflip: bool  # flip horizontally with probability 1/2

    def to_dict(self) -> dict:
        return {"name": self.name, "scale": list(self.scale) if self.scale else None,
                "ratio": list(self.ratio) if self.ratio else None, "hflip": self.hflip}

    @property
    def text(self) -> str:
        """The --augment value that gives this policy back."""
        if self.scale is None or self.scale == DEFAULT_SCALE:
            return self.name
        return f"{self.name}:{self.scale[0]:g}-{self.scale[1]:g}"


def parse_policy(text: str) -> ViewPolicy:
    """`crop-flip`, `crop`, `flip`, or `crop-flip:LO-HI` / `crop:LO-HI` (a crop's area fraction range)."""
    if not isinstance(text, str):
        raise UsageError(f"--augment must be a policy name, got {text!r}")
    name, sep, scale_text = text.strip().partition(":")
    if name not in POLICIES:
        raise UsageError(f"unknown --augment policy {text!r}; use crop-flip, crop or flip "
                         "(a crop's area range as e.g. crop-flip:0.5-1)")
    if name == "flip":
        if sep:
            raise UsageError(f"--augment flip takes no scale range (got {text!r}); use crop-flip:LO-HI for crops")
        return ViewPolicy("flip", None, None, True)
    scale = DEFAULT_SCALE
    if sep:
        low, dash, high = scale_text.partition("-")
        try:
            scale = (float(low), float(high)) if dash else (math.nan, math.nan)
        except ValueError:
            scale = (math.nan, math.nan)
        if not (0 < scale[0] <= scale[1] <= 1):
            raise UsageError(f"--augment {text!r}: the scale range must be LO-HI with 0 < LO <= HI <= 1 "
                             "(an area fraction, e.g. crop-flip:0.5-1)")
    return ViewPolicy(name, scale, DEFAULT_RATIO, name == "crop-flip")


def check_view_count(views: object) -> None:
    if not isinstance(views, int) or isinstance(views, bool) or not 0 <= views <= 1024:
        raise UsageError(f"--views must be an integer from 0 to 1024 (augmented views per train image), got {views!r}")


def view_key(entry_key: str, policy: ViewPolicy, seed: int) -> str:
    return sha256_text(canonical_json({"entry_key": entry_key, "policy": policy.to_dict(), "seed": seed,
                                       "views_format": 1}))


def view_dir(entry_path: Path, key: str) -> Path:
    return entry_path / VIEWS_DIR / key[:16]


def view_shard(view: int, number: int) -> str:
    return shard_file(f"train-v{view:04d}-{number:05d}.h5")


def write_view_manifest(directory: Path, manifest: dict) -> None:
    """Sealed, validated by the view schema first, then written by the one atomic writer."""
    from .atomic import json_text, write_atomic
    from .integrity import seal_json

    path = directory / MANIFEST
    text = json_text(seal_json(manifest))
    _check(json.loads(text), path)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), "the view manifest")


@functools.cache
def _schema():
    """The view manifest's schema (pydantic, imported on first use)."""
    from typing import Annotated, Literal

    from pydantic import Field, StringConstraints

    from ..options import DTYPES
    from .schema import Count, FeatureLayout, Hex64, Record, TapName, TapRecord

    class ViewShardRecord(Record):
        file: str
        view: Count
        rows: Count
        sha256: Hex64
        bytes: Count
        features: dict[TapName, FeatureLayout] | None = None

    class PolicyRecord(Record):
        name: Literal[POLICIES]  # type: ignore[valid-type]
        scale: Annotated[list[float], Field(min_length=2, max_length=2)] | None
        ratio: Annotated[list[float], Field(min_length=2, max_length=2)] | None
        hflip: bool

    class ViewManifest(Record):
        kind: Literal["views"]
        views_format: Literal[1]
        view_key: Hex64
        entry_key: Hex64
        entry_id: Hex64
        augment: Annotated[str, StringConstraints(min_length=1, max_length=64)]
        policy: PolicyRecord
        seed: Count
        requested: Count
        rows: Count
        blocks: Count
        shard_size: Annotated[int, Field(ge=1)]
        dtype: Literal[DTYPES]  # type: ignore[valid-type]
        taps: Annotated[dict[TapName, TapRecord], Field(min_length=1)]
        shards: list[ViewShardRecord]

    return ViewManifest


def _check(manifest: object, file: Path) -> None:
    """Types and values of a view manifest, and every shard path confined to its folder."""
    from .schema import check

    check(_schema(), manifest, file, "run featurecache verify --repair, or delete the folder and extract the "
          "views again")
    for record in manifest["shards"]:
        match = SHARD_PATTERN.fullmatch(record["file"])
        if not match or int(match[1]) != record["view"]:
            raise CorruptCacheError(f"{file}: view shard {record['file']!r} is not shards/train-vVVVV-NNNNN.h5 of "
                                    f"view {record['view']}; run featurecache verify --repair")


def read_view_manifest(directory: Path) -> dict:
    """A view set's manifest, checked (checksum, schema) before use."""
    from .integrity import read_sealed_json

    file = directory / MANIFEST
    manifest = read_sealed_json(file, "view manifest", "run featurecache verify --repair")
    _check(manifest, file)
    return manifest


def view_sets(entry_path: Path) -> list[tuple[Path, dict | None, str | None]]:
    """Every view set folder of the entry: (folder, manifest or None, what is wrong or None)."""
    folder = entry_path / VIEWS_DIR
    out = []
    for directory in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not directory.is_dir():
            continue
        try:
            out.append((directory, read_view_manifest(directory), None))
        except FileNotFoundError:
            out.append((directory, None, "a view set folder without a manifest"))
        except FeatureCacheError as error:
            out.append((directory, None, str(error)))
    return out


def available_views(manifest: dict) -> int:
    """How many views (0..K-1) have every block of rows listed."""
    blocks = manifest["blocks"]
    if blocks == 0:  # no train row: every view is trivially complete
        return manifest["requested"]
    listed = {(r["view"], int(SHARD_PATTERN.fullmatch(r["file"])[2])) for r in manifest["shards"]}
    count = 0
    while all((count, block) in listed for block in range(blocks)):
        count += 1
    return count


def choose_view_set(entry_path: Path, entry_key: str, which: str | None) -> tuple[Path, dict]:
    """The view set of this entry's current content that `which` names (a policy as given to
    --augment, or a view key prefix); with None, the only one there is."""
    current, damaged = [], []
    for directory, manifest, problem in view_sets(entry_path):
        if manifest is None:
            damaged.append(f"{directory.name} ({problem})")
        elif manifest["entry_key"] == entry_key:
            current.append((directory, manifest))
    if which is not None:
        policy = None
        try:
            policy = parse_policy(which).to_dict()
        except UsageError:
            pass
        current = [(d, m) for d, m in current if m["policy"] == policy or m["view_key"].startswith(which)]
    if len(current) == 1:
        return current[0]
    sets = ", ".join(f"{m['view_key'][:16]} ({m['augment']}, view seed {m['seed']}, {available_views(m)} views)"
                     for _, m in current)
    if not current:
        hint = f"; damaged: {', '.join(damaged)} (run featurecache verify --repair)" if damaged else ""
        wanted = f" matching {which!r}" if which else ""
        raise HeadError(f"{entry_path.name} has no view set{wanted} for its current files{hint}; run featurecache "
                        "extract with --views K --augment POLICY first")
    raise HeadError(f"{entry_path.name} has several view sets ({sets}); name one with --view-set KEY")


def load_views(cache, directory: Path, manifest: dict, tap: str, count: int) -> np.ndarray:
    """Views 0..count-1 of the cache's train rows, in the cache's row order: (N, count, *shape).

    Every shard is checked (size, features checksum, columns) before use; a row of the
    cache the view set does not hold is refused, never silently dropped."""
    from .shards import read_rows

    available = available_views(manifest)
    if count > available:
        raise HeadError(f"the view set {manifest['view_key'][:16]} holds {available} complete views, {count} were "
                        f"asked for; run featurecache extract with --views {count} --augment {manifest['augment']}")
    shape = cache.tap_shapes[tap]
    fingerprints = cache.fingerprints("train")
    position = {f: i for i, f in enumerate(fingerprints)}
    out = np.empty((len(fingerprints), count, *shape), dtype=cache.manifest["dtype"])
    filled = np.zeros((len(fingerprints), count), dtype=bool)
    for record in manifest["shards"]:
        view = record["view"]
        if view >= count:
            continue
        file = directory / record["file"]
        if not file.is_file() or file.stat().st_size != record["bytes"]:
            raise CorruptCacheError(f"view shard {file} is missing or has the wrong size; run featurecache verify")
        rows = read_rows(file, record["rows"], {tap: shape}, split="train")
        where = [position.get(f, -1) for f in rows.fingerprints]
        if min(where, default=0) < 0:
            raise CorruptCacheError(f"view shard {file} holds rows the entry's train split does not; "
                                    "run featurecache verify")
        out[where, view] = rows.features[tap]
        filled[where, view] = True
    if not filled.all():
        raise CorruptCacheError(f"the view set {directory} lacks views of {int((~filled.any(1)).sum())} train rows; "
                                "run featurecache verify --repair")
    return out


def check_view_sets(entry_path: Path, tap_shapes: dict, n_classes: int, check_shard) -> list[tuple[str, str, str]]:
    """Problems of every view set: (file relative to the entry, what, kind) with kind `shard`
    (a listed shard to drop and recompute), `stray` (a file to delete) or `set` (an unreadable
    view manifest: its folder is deleted by --repair). `check_shard` is verify's shard check."""
    from .atomic import is_temporary

    problems = []
    folder = entry_path / VIEWS_DIR
    for file in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not file.is_dir():  # only view set folders belong here
            what = "temporary file left by an interrupted run" if is_temporary(file.name) else "unexpected file"
            problems.append((f"{VIEWS_DIR}/{file.name}", what, "stray"))
    for directory, manifest, problem in view_sets(entry_path):
        relative = directory.relative_to(entry_path).as_posix()
        if manifest is None:
            problems.append((f"{relative}/{MANIFEST}", problem, "set"))
            continue
        listed = set()
        for record in manifest["shards"]:
            listed.add(record["file"])
            what = check_shard(directory, {**record, "split": "train"}, tap_shapes, n_classes)
            if what:
                problems.append((f"{relative}/{record['file']}", what, "shard"))
        for file in sorted(directory.iterdir()):
            if is_temporary(file.name) and file.is_file():
                problems.append((f"{relative}/{file.name}", "temporary file left by an interrupted run", "stray"))
            elif file.name not in (MANIFEST, SHARDS_DIR):
                problems.append((f"{relative}/{file.name}", "unexpected file in a view set", "stray"))
        shards = directory / SHARDS_DIR
        for file in sorted(shards.iterdir()) if shards.is_dir() else []:
            name = shard_file(file.name)
            if is_temporary(file.name):
                problems.append((f"{relative}/{name}", "temporary file left by an interrupted run", "stray"))
            elif name not in listed:
                problems.append((f"{relative}/{name}", "not in the view manifest (a run died before listing it; "
                                 "--repair deletes it and extract computes it again)", "stray"))
    return problems


def drop_view_shards(entry_path: Path, files: list[str]) -> list[dict]:
    """Remove damaged listed view shards (manifest first, then the files); returns the view
    sets touched, as (policy text, seed, views wanted) for extract to compute them again."""
    touched = []
    by_set: dict[Path, set[str]] = {}
    for relative in files:
        directory, _, shard = relative.partition(f"/{SHARDS_DIR}/")
        by_set.setdefault(entry_path / directory, set()).add(shard_file(shard))
    for directory, bad in by_set.items():
        manifest = read_view_manifest(directory)
        kept = [r for r in manifest["shards"] if r["file"] not in bad]
        write_view_manifest(directory, {k: v for k, v in manifest.items() if k != "checksum"} | {"shards": kept})
        for shard in bad:
            (directory / shard).unlink(missing_ok=True)
        touched.append({"augment": manifest["augment"], "seed": manifest["seed"], "views": manifest["requested"],
                        "entry_key": manifest["entry_key"]})
    return touched


def summary_lines(entry_path: Path, entry_key: str) -> list[tuple[str, str]]:
    """(label, value) lines for `info`: every view set with its size; one made for files the
    entry no longer has is marked stale (fit-head never reads it) with how to free its space."""
    from .summary import human_bytes

    lines = []
    for directory, manifest, problem in view_sets(entry_path):
        size = human_bytes(sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()))
        if manifest is None:
            lines.append(("view set", f"{directory.name}: damaged ({problem}), {size}; run featurecache verify --repair"))
            continue
        text = (f"{directory.name}: {manifest['augment']}, view seed {manifest['seed']}, "
                f"{available_views(manifest)} views of {manifest['rows']} train rows, {size}")
        if manifest["entry_key"] != entry_key:
            text += (f"; stale: made for files the entry no longer has, so never read (delete {directory} "
                     "to free its space)")
        lines.append(("view set", text))
    return lines
