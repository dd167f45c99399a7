"""Byte-identical images in two splits or under two classes, which a listing cannot see.

A test image that is a copy of a train image is scored on what the head learnt, so test
figures read high; a copy under another class means one of the two labels is wrong.
Neither is refused (public datasets ship such copies); both are reported as warnings
naming a few pairs. Files are grouped by size first, so only files whose size another
file shares are read: the first 64 KiB of each, then the whole of those still alike.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .sources import Sample, printable_path

HEAD_BYTES = 1 << 16  # the first pass reads this much of each candidate file
CHUNK_BYTES = 1 << 20
SHOWN = 3  # pairs named in a warning

Content = Path | bytes  # an image file, or an in-memory image's bytes (a `_Digest` of them once listed)


class _Digest(str):
    """An in-memory image's digest, taken when it was listed so its bytes are not all held at once."""


@dataclass(frozen=True)
class CopyPair:
    """`copy` holds the same bytes as `original`, in another split or under another class."""

    original: Sample
    copy: Sample


def _digest(content: Content, limit: int | None) -> str | None:
    if isinstance(content, _Digest):
        return content  # the whole image's: stricter than a first pass, the same as the second
    hasher = xxhash.xxh3_128()
    try:
        with open(content, "rb") as handle:
            if limit:
                hasher.update(handle.read(limit))
            else:
                while chunk := handle.read(CHUNK_BYTES):
                    hasher.update(chunk)
    except OSError:
        return None  # unreadable: extraction skips it and says why
    return hasher.hexdigest()


def _size(content: Content) -> int | None:
    if isinstance(content, bytes):
        return len(content)
    try:
        return content.stat().st_size
    except OSError:
        return None


def _conflicting(group: list[tuple[Sample, Content]]) -> bool:
    """Whether a group of alike files spans two splits or two labels (else copies do no harm)."""
    return len({(sample.split, sample.label) for sample, _ in group}) > 1


def _refine(group: list[tuple[Sample, Content]], limit: int | None) -> list[list[tuple[Sample, Content]]]:
    buckets: dict[str, list[tuple[Sample, Content]]] = defaultdict(list)
    for sample, content in group:
        digest = _digest(content, limit)
        if digest is not None:
            buckets[digest].append((sample, content))
    return [bucket for bucket in buckets.values() if len(bucket) > 1 and _conflicting(bucket)]


def find_copies(samples: Iterable[Sample], content_of: Callable[[Sample], Content | None],
                new: Callable[[Sample], bool] = lambda sample: True) -> list[CopyPair]:
    """Pairs of byte-identical samples in two splits or under two labels, each with at least
    one `new` sample (rows already checked when they were computed are not read again).
    The original of a pair is the first of its bytes in listing order (train before val and test)."""
    by_size: dict[int, list[tuple[Sample, Content]]] = defaultdict(list)
    position: dict[tuple[str, str], int] = {}  # listing order (a sample's index may count per split)
    for sample in samples:
        position[(sample.split, sample.path)] = len(position)
        content = content_of(sample)
        size = None if content is None else _size(content)
        if isinstance(content, bytes):
            content = _Digest(xxhash.xxh3_128_hexdigest(content))
        if size is not None:
            by_size[size].append((sample, content))
    pairs = []
    for size, group in by_size.items():
        if len(group) < 2 or not _conflicting(group) or not any(new(sample) for sample, _ in group):
            continue
        alike = _refine(group, HEAD_BYTES)
        if size > HEAD_BYTES:
            alike = [bucket for part in alike for bucket in _refine(part, None)]
        for bucket in alike:
            if not any(new(sample) for sample, _ in bucket):
                continue
            ordered = sorted((sample for sample, _ in bucket), key=lambda s: position[(s.split, s.path)])
            original = ordered[0]
            pairs += [CopyPair(original, sample) for sample in ordered[1:]
                      if (sample.split, sample.label) != (original.split, original.label)]
    return sorted(pairs, key=lambda pair: position[(pair.copy.split, pair.copy.path)])


def copy_records(pairs: list[CopyPair], classes: list[str]) -> list[dict]:
    """The manifest's `copies` records of `find_copies`' pairs (class names, "" unlabelled)."""
    def name(sample: Sample) -> str:
        return classes[sample.label] if sample.label >= 0 else ""

    return [{"path": p.copy.path, "split": p.copy.split, "label": name(p.copy), "original": p.original.path,
             "original_split": p.original.split, "original_label": name(p.original)} for p in pairs]


def merge_records(previous: list[dict], fresh: list[dict], current: Iterable[Sample],
                  new: Callable[[Sample], bool]) -> list[dict]:
    """This run's records and an earlier run's whose two images are still listed and were not
    read again (unchanged), in listing order."""
    current = list(current)
    position = {(sample.split, sample.path): i for i, sample in enumerate(current)}
    unchanged = {(sample.split, sample.path) for sample in current if not new(sample)}
    kept = [r for r in previous
            if (r["split"], r["path"]) in unchanged and (r["original_split"], r["original"]) in unchanged]
    seen = {(r["split"], r["path"]) for r in fresh}
    merged = fresh + [r for r in kept if (r["split"], r["path"]) not in seen]
    return sorted(merged, key=lambda r: position[(r["split"], r["path"])])


def copy_warnings(records: list[dict]) -> list[str]:
    """Warnings for `copies` records: copies across splits (scores read high) and copies
    under another class in one split (a wrong label); none for an unlabelled split's."""
    def shown(chosen: list[dict]) -> str:
        named = ", ".join(f"{printable_path(r['path'])} = {printable_path(r['original'])}" for r in chosen[:SHOWN])
        return named + (", ..." if len(chosen) > SHOWN else "")

    across: dict[tuple[str, str], list[dict]] = defaultdict(list)
    relabelled: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        if not record["label"] or not record["original_label"]:
            continue  # an unlabelled split is never scored: a copy there misleads no figure
        if record["split"] != record["original_split"]:
            across[(record["split"], record["original_split"])].append(record)
        else:
            relabelled[record["split"]].append(record)
    warnings = [f"{len(chosen)} {split} image(s) are byte-identical copies of {original} images ({shown(chosen)}): "
                f"they are scored on images a head was {'fitted' if original == 'train' else 'chosen'} on, so "
                f"{split} figures read high; remove the copies from one split"
                for (split, original), chosen in sorted(across.items())]
    warnings += [f"{len(chosen)} {split} image(s) are byte-identical copies of {split} images under another class "
                 f"({shown(chosen)}; e.g. {chosen[0]['label']} and {chosen[0]['original_label']}): one label of "
                 "each pair is wrong; remove or relabel the copies"
                 for split, chosen in sorted(relabelled.items())]
    return warnings
