"""Decide what an extract run must do, given what the entry already holds.

Rows are matched by source fingerprint. A committed shard whose rows are all still
wanted is kept as is; one that lost rows (files removed or changed) or whose labels
moved (the class list changed) is rewritten from its own rows, without the backbone;
a shard file that was renamed into place but never listed (the run died before the
manifest update) is adopted when it holds only wanted rows. Everything else is
computed, in source order, in shards of `shard_size` images: the same layout an
uninterrupted run produces. `Plan.first_position` lets the manifest list every shard
of a split in source order, however the shards came to be (kept, adopted, rewritten or
computed, by one process or by several ranks).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CorruptCacheError
from ..cache.atomic import is_temporary
from ..cache.layout import SHARDS_DIR, shard_file
from ..cache.shards import features_layout, file_sha256, open_h5, read_fingerprints, shard_name, shard_number
from ..data.sources import Sample, Source, split_sort_key

log = logging.getLogger("featurecache")


@dataclass
class PlannedShard:
    split: str
    number: int
    start: int  # positions [start, stop) in Plan.to_compute
    stop: int

    @property
    def file(self) -> str:
        return shard_file(shard_name(self.split, self.number))


@dataclass
class Rewrite:
    record: dict  # the old shard's manifest record
    keep: np.ndarray  # bool mask of the rows to keep
    number: int  # the new shard's number


@dataclass
class Plan:
    samples: dict[str, Sample]  # every current sample by fingerprint
    splits: list[str]  # every split of the source, in order
    kept: list[dict] = field(default_factory=list)  # manifest records kept as they are
    kept_skipped: list[dict] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    to_compute: list[Sample] = field(default_factory=list)
    shards: list[PlannedShard] = field(default_factory=list)
    first_position: dict[str, int] = field(default_factory=dict)  # shard file -> its first row's source position

    def canonical_order(self, records: list[dict]) -> list[dict]:
        """Shard records by split, then by their first row's position in the source."""
        split_order = {split: i for i, split in enumerate(self.splits)}
        return sorted(records, key=lambda r: (split_order.get(r["split"], len(split_order)),
                                              self.first_position.get(r["file"], len(self.samples)),
                                              shard_number(r["file"])))


def _remove_temp_files(path: Path) -> None:
    # Safe: the caller holds the entry's lock, so no live writer owns these.
    for directory in (path, path / SHARDS_DIR):
        for file in directory.iterdir():
            if is_temporary(file.name):
                file.unlink(missing_ok=True)


def _orphan_record(file: Path, entry_id: str) -> tuple[dict, list[str]] | None:
    try:
        with open_h5(file) as handle:
            if handle.attrs.get("entry_id") != entry_id:
                return None
            split = str(handle.attrs["split"])
            skipped = json.loads(str(handle.attrs.get("skipped", "[]")))
        fingerprints = read_fingerprints(file)
    except (OSError, KeyError, ValueError, CorruptCacheError):
        return None
    record = {"file": shard_file(file.name), "split": split, "rows": len(fingerprints),
              "sha256": file_sha256(file), "bytes": file.stat().st_size, "skipped": skipped}
    if layout := features_layout(file):
        record["features"] = layout
    return record, fingerprints


def make_plan(path: Path, previous: dict | None, source: Source, shard_size: int, *, entry_id: str) -> Plan:
    """Compare the entry on disk with the source and return the work to do."""
    _remove_temp_files(path)
    current = {s.fingerprint: s for s in source.samples}
    position = {s.fingerprint: i for i, s in enumerate(source.samples)}
    plan = Plan(samples=current, splits=sorted({s.split for s in source.samples}, key=split_sort_key))
    covered: set[str] = set()
    listed: set[str] = set()
    next_number: dict[str, int] = {}

    def claim(split: str, number: int) -> None:
        next_number[split] = max(next_number.get(split, 0), number + 1)

    same_labels = previous is not None and previous.get("classes") == source.classes
    for record in (previous or {}).get("shards", []):
        listed.add(record["file"])
        claim(record["split"], shard_number(record["file"]))
        try:
            fingerprints = read_fingerprints(path / record["file"])
        except CorruptCacheError as error:
            log.warning("dropping damaged shard %s: %s", record["file"], error)
            continue
        keep = np.array([f in current and f not in covered for f in fingerprints], dtype=bool)
        covered.update(f for f, k in zip(fingerprints, keep) if k)
        if keep.all() and same_labels and len(keep) == record["rows"]:
            plan.kept.append(record)
        elif keep.any():
            plan.rewrites.append(Rewrite(record, keep, -1))
        if keep.any():
            first = min(position[f] for f, k in zip(fingerprints, keep) if k)
            plan.first_position[record["file"]] = first
    for skip in (previous or {}).get("skipped", []):
        if skip["fingerprint"] in current and skip["fingerprint"] not in covered:
            plan.kept_skipped.append(skip)
            covered.add(skip["fingerprint"])

    for file in sorted((path / SHARDS_DIR).glob("*.h5")):
        relative = shard_file(file.name)
        if relative in listed:
            continue
        orphan = _orphan_record(file, entry_id)
        wanted = orphan is not None and (previous is None or same_labels) and all(
            f in current and f not in covered for f in orphan[1] + [s["fingerprint"] for s in orphan[0]["skipped"]])
        if orphan is None or not wanted:
            file.unlink(missing_ok=True)
            continue
        record, fingerprints = orphan
        plan.kept_skipped.extend(record.pop("skipped"))
        plan.kept.append(record)
        if fingerprints:
            plan.first_position[record["file"]] = min(position[f] for f in fingerprints)
        covered.update(fingerprints)
        covered.update(s["fingerprint"] for s in plan.kept_skipped)
        claim(record["split"], shard_number(file.name))

    for rewrite in plan.rewrites:
        split = rewrite.record["split"]
        rewrite.number = next_number.get(split, 0)
        claim(split, rewrite.number)
        first = plan.first_position.pop(rewrite.record["file"])
        plan.first_position[shard_file(shard_name(split, rewrite.number))] = first

    plan.to_compute = [s for s in source.samples if s.fingerprint not in covered]
    for split in plan.splits:
        positions = [i for i, s in enumerate(plan.to_compute) if s.split == split]
        for offset in range(0, len(positions), shard_size):
            chunk = positions[offset : offset + shard_size]
            number = next_number.get(split, 0)
            planned = PlannedShard(split, number, chunk[0], chunk[-1] + 1)
            plan.shards.append(planned)
            plan.first_position[planned.file] = position[plan.to_compute[chunk[0]].fingerprint]
            claim(split, number)
    return plan
