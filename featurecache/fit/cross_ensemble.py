"""Soft voting across cache entries of one source: heads fitted on different backbones' features.

A member is a head of the home entry or of a sibling entry (same cache root) extracted
from the same source, with the same classes in the same order; anything else is refused.
Rows are matched by their relative path, never by position: extraction may have skipped
a file in one entry and not in another, so only the paths every member's entry holds are
scored, and the rows left out are counted in the record and logged as a warning.

The record, stored in the home entry's heads/, names each member's entry folder, cache
key and head checksum, so a member fitted again, an entry extracted again or deleted makes
the ensemble stale (refused with the command that makes it again). It is scored as every
ensemble is, on rows none of its members trained on: the paths in every member's own
validation rows (members chosen on different kinds of validation are refused), and test.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cache.schema import CROSS_ENSEMBLE
from ..cache.store import Cache, open_cache
from ..errors import CorruptCacheError, HeadError, MismatchError
from ..heads.ensemble import normalized_weights
from ..heads.metrics import classification_metrics
from .headstore import (check_head_name, cross_member_changes, load_head, read_record, read_record_with_checksum,
                        refuse_taken, save_head, stale_error)
from .stage import (FitResult, _features, check_ensemble_weights, ensemble_record, ensemble_rows, ensemble_splits,
                    make_ensemble, refuse_own_member, shared_validation)

log = logging.getLogger("featurecache")

#: A member: a head of the home entry, or (entry, head) with the entry as a folder name, a path or a Cache.
MemberRef = str | tuple[str | Path | Cache, str]


@dataclass(frozen=True)
class Member:
    cache: Cache
    head: str

    @property
    def label(self) -> str:
        return f"{self.cache.path.name}:{self.head}"


@dataclass
class Voted:
    """One split's soft vote: the paths every member's entry holds, their labels and probabilities."""

    paths: list[str]
    labels: np.ndarray
    probabilities: np.ndarray
    missing_from: dict[str, list[str]]  # path left out -> the members whose entries lack it

    def alignment(self) -> dict:
        counts: dict[str, int] = {}
        for members in self.missing_from.values():
            for member in members:
                counts[member] = counts.get(member, 0) + 1
        return {"rows": len(self.paths), "left_out": len(self.missing_from), "missing": counts,
                "examples": sorted(self.missing_from)[:5]}


def parse_member(text: str) -> MemberRef:
    """`HEAD` (a head of the home entry) or `ENTRY:HEAD` (ENTRY a sibling folder name or a path)."""
    entry, colon, head = text.rpartition(":")  # head names hold no ':', entry paths may
    if not colon:
        return text
    if not entry or not head:
        raise HeadError(f"member {text!r} is not HEAD or ENTRY:HEAD (e.g. logistic or photos-resnet18-0123:logistic)")
    return (entry, head)


def _resolve(home: Cache, members: list[MemberRef]) -> list[Member]:
    resolved = []
    for ref in members:
        if isinstance(ref, str):
            entry, head = home, ref
        elif isinstance(ref, tuple) and len(ref) == 2 and isinstance(ref[1], str):
            where, head = ref
            entry = where if isinstance(where, Cache) else open_cache(where, root=home.path.parent)
        else:
            raise HeadError(f"an ensemble member is a head name or (entry, head name), got {ref!r}")
        check_head_name(head, "member")
        if entry.path.resolve() == home.path.resolve():
            entry = home
        elif entry.path.resolve().parent != home.path.resolve().parent:
            raise HeadError(f"entry {entry.path} is not beside {home.path.name} (in {home.path.parent}); an "
                            "ensemble records its entries by folder name, so they must share one cache root: "
                            "extract there with --root")
        resolved.append(Member(entry, head))
    labels = [member.label for member in resolved]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise HeadError(f"member {twice[0]} is named twice; name each head once")
    return resolved


def _check_same_source(home: Cache, members: list[Member]) -> None:
    for member in members:
        other = member.cache
        if other.classes != home.classes:
            differ = next((i for i, (a, b) in enumerate(zip(home.classes, other.classes)) if a != b),
                          min(len(home.classes), len(other.classes)))
            raise MismatchError(
                f"{other.path.name} and {home.path.name} list other classes ({len(other.classes)} vs "
                f"{len(home.classes)}, first difference at position {differ}); soft voting needs the same classes "
                "in the same order: extract both entries from the same source")
        mine, theirs = home.manifest["config"]["source"], other.manifest["config"]["source"]
        if mine != theirs:
            keys = sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k))
            raise MismatchError(
                f"{other.path.name} was extracted from another source than {home.path.name} (their source "
                f"records differ in {', '.join(keys)}: {theirs.get(keys[0])!r} vs {mine.get(keys[0])!r}); an "
                "ensemble across entries matches the same images by path: extract both from one source")


def _member_rows(cache: Cache, tap: str, split: str, validation: dict | None) -> tuple[list[str], np.ndarray,
                                                                                           np.ndarray, list[str]]:
    """(paths, features, labels, fingerprints) of one entry's rows of an ensemble's scoring split `split`."""
    name, rows = ensemble_rows(cache, split, validation)
    if name not in cache.splits:
        return [], np.zeros((0, 1), np.float32), np.zeros(0, np.int64), []
    paths, features, labels, prints = (cache.paths(name), _features(cache, name, tap), cache.labels(name),
                                       cache.fingerprints(name))
    if rows is None:
        return paths, features, labels, prints
    return [paths[i] for i in rows], features[rows], labels[rows], [prints[i] for i in rows]


def vote(members: list[tuple[Member, object, str]], weights: np.ndarray, split: str,
         validation: dict | None = None) -> Voted:
    """The weighted mean of the members' probabilities over the paths of `split` every member's entry holds.

    `members` are (member, loaded head, tap). Each member scores its own entry's rows; rows are
    then matched by path. A path listed twice, labelled differently by two entries or holding
    another file in each (the file changed between their extractions) is refused."""
    parts = []
    for member, head, tap in members:
        paths, features, labels, prints = _member_rows(member.cache, tap, split, validation)
        where: dict[str, int] = {}
        for row, path in enumerate(paths):
            if path in where:
                raise CorruptCacheError(f"{member.cache.path.name} lists {path} twice in its {split} rows, so rows "
                                        "cannot be matched by path; run featurecache verify")
            where[path] = row
        probabilities = np.asarray(head.predict_proba(features)) if len(paths) else None
        parts.append((member, paths, where, labels, probabilities, prints))
    every = list(dict.fromkeys(p for _, paths, *_ in parts for p in paths))
    common = [path for path in every if all(path in where for _, _, where, *_ in parts)]
    held = set(common)
    missing_from = {path: [m.label for m, _, where, *_ in parts if path not in where]
                    for path in every if path not in held}
    total = np.zeros((len(common), len(members[0][0].cache.classes)))
    labels = None
    for (member, _, where, member_labels, probabilities, prints), weight in zip(parts, weights):
        if not common:
            break
        rows = np.fromiter((where[path] for path in common), np.int64, len(common))
        if labels is None:
            labels, first, files = member_labels[rows], member, [prints[row] for row in rows]
        elif (member_labels[rows] != labels).any():
            at = int(np.flatnonzero(member_labels[rows] != labels)[0])
            raise MismatchError(f"{common[at]} is labelled differently in {member.cache.path.name} and "
                                f"{first.cache.path.name}: the entries do not describe the same images; extract "
                                "them again from the same source")
        elif member.cache.fingerprint_kind == first.cache.fingerprint_kind:  # else the fingerprints never agree
            changed = next((path for path, row, file in zip(common, rows, files) if prints[row] != file), None)
            if changed is not None:
                raise MismatchError(
                    f"{changed} is another file in {member.cache.path.name} than in {first.cache.path.name} (it "
                    "changed between their extractions), so their features describe different images; run "
                    "featurecache extract again for the older entry, fit its head again, then make the ensemble")
        total += weight * probabilities[rows]
    return Voted(common, labels if labels is not None else np.zeros(0, np.int64), total, missing_from)


def _carved_to_training(split: str, voted: Voted, members: list[Member]) -> dict[str, list[str]]:
    """Left-out paths of a carved split that a member's entry holds but carved into its training rows."""
    if split != "val (from train)":
        return {}
    trained: dict[str, list[str]] = {}
    for member in members:
        held = set(member.cache.paths("train"))
        for path, lacking in voted.missing_from.items():
            if member.label in lacking and path in held:
                trained.setdefault(path, []).append(member.label)
    return trained


def _warn_left_out(name: str, split: str, voted: Voted, trained: dict[str, list[str]]) -> None:
    """Say which rows were left out and why: not in an entry, or carved into a member's training rows."""
    if not voted.missing_from:
        return
    absent = {path: [m for m in lacking if m not in trained.get(path, [])]
              for path, lacking in voted.missing_from.items()}
    absent = {path: lacking for path, lacking in absent.items() if lacking}
    parts = []
    if absent:
        counts: dict[str, int] = {}
        for lacking in absent.values():
            for member in lacking:
                counts[member] = counts.get(member, 0) + 1
        parts.append(f"{len(absent)} not in every member's entry ("
                     + ", ".join(f"{n} missing from {m}" for m, n in counts.items())
                     + f"; e.g. {', '.join(sorted(absent)[:3])})")
    if trained:
        counts = {}
        for lacking in trained.values():
            for member in lacking:
                counts[member] = counts.get(member, 0) + 1
        parts.append(f"{len(trained)} carved into training by another member's entry ("
                     + ", ".join(f"{n} trained on by {m}" for m, n in counts.items())
                     + f"; e.g. {', '.join(sorted(trained)[:3])}): the entries' train splits hold other files, "
                     "so the same --val-fraction and --seed carve other rows from them")
    log.warning("ensemble %s: %d %s row(s) were left out: %s; it is scored on the %d rows every member held out",
                name, len(voted.missing_from), split, "; ".join(parts), len(voted.paths))


def make_cross_ensemble(cache: Cache | str | Path, members: list[MemberRef], *, name: str,
                        weights: list[float] | None = None, overwrite: bool = False) -> FitResult:
    """Soft voting over heads of entries of one source, saved as head `name` of `cache` (the home entry)."""
    check_head_name(name, "ensemble")
    home = cache if isinstance(cache, Cache) else open_cache(cache)
    check_ensemble_weights(weights, len(members))
    resolved = _resolve(home, members)
    if all(member.cache is home for member in resolved):  # the home entry named explicitly: a plain ensemble
        return make_ensemble(home, [member.head for member in resolved], name=name, weights=weights,
                             overwrite=overwrite)
    if len(resolved) < 2:
        raise HeadError("an ensemble across entries needs two members or more")
    refuse_own_member(name, [member.head for member in resolved if member.cache is home])
    _check_same_source(home, resolved)
    refuse_taken(home, name, overwrite)
    loaded = [load_head(member.cache, member.head) for member in resolved]  # stale or mismatched heads refused
    checksums = [read_record_with_checksum(member.cache, member.head)[1] for member in resolved]
    validation = shared_validation({m.label: record for m, (_, record) in zip(resolved, loaded)})
    normalised = normalized_weights(weights, len(resolved))
    voters = [(member, head, record["tap"]) for member, (head, record) in zip(resolved, loaded)]
    metrics, alignment = {}, {}
    for split in ensemble_splits([member.cache for member in resolved], validation):
        voted = vote(voters, normalised, split, validation)
        alignment[split] = voted.alignment()
        trained = _carved_to_training(split, voted, resolved)
        if trained:  # in every entry, but some member trained on them: its train split holds other files
            alignment[split]["carved_into_training"] = len(trained)
            missing = alignment[split]["missing"]  # what an entry lacks, not what it carved otherwise
            for member in (m for lacking in trained.values() for m in lacking):
                missing[member] -= 1
            alignment[split]["missing"] = {m: n for m, n in missing.items() if n}
        _warn_left_out(name, split, voted, trained)
        if voted.paths:
            metrics[split] = classification_metrics(voted.probabilities, voted.labels, home.classes, f"{split} rows")
    if not metrics:
        raise HeadError("no row is left to score the ensemble honestly: the members' entries share no validation "
                        "or test path")
    labels = [member.label for member in resolved]
    record = ensemble_record(
        home, CROSS_ENSEMBLE, loaded[0][1]["tap"], normalised, validation, metrics,
        cross_members=[{"entry": m.cache.path.name, "cache_key": m.cache.key, "head": m.head, "checksum": c,
                        "tap": r["tap"]} for m, (_, r), c in zip(resolved, loaded, checksums)], alignment=alignment)
    saved = _SavedVote(labels, normalised, len(home.classes), sum(r["config"]["n_features"] for _, r in loaded))
    path = save_head(home, name, saved, record, overwrite=overwrite)
    return FitResult(name, path, saved, read_record(home, name))


class _SavedVote:
    """What head.safetensors holds of an ensemble across entries: its weights (members are loaded from their entries)."""

    name = CROSS_ENSEMBLE

    def __init__(self, labels: list[str], weights: np.ndarray, n_classes: int, n_features: int) -> None:
        self.labels, self.weights_, self.n_classes, self.n_features = labels, weights, n_classes, n_features

    def to_tensors(self) -> dict:
        import torch

        return {"weights": torch.from_numpy(self.weights_.copy())}

    def to_config(self) -> dict:
        return {"head": CROSS_ENSEMBLE, "params": {"members": self.labels, "weights": self.weights_.tolist()},
                "n_classes": self.n_classes, "n_features": self.n_features}


def load_cross_ensemble(home: Cache, name: str) -> tuple[dict, list[tuple[Member, object, str]], np.ndarray]:
    """(record, [(member, head, tap)], normalised weights) of a saved ensemble across entries; a stale one
    (a member fitted again, an entry extracted again or gone) is refused with the command that makes it again."""
    record = read_record(home, name)
    if record["head"] != CROSS_ENSEMBLE:
        raise HeadError(f"head {name!r} is a {record['head']} head of one entry, not an ensemble across entries")
    changed = cross_member_changes(home, record)
    if record["cache_key"] != home.key:
        changed.insert(0, f"{home.path.name} itself (extracted again)")
    if changed:
        raise stale_error(home, name, record, changed[0])
    voters = []
    for member in record["cross_members"]:
        cache = home if member["entry"] == home.path.name else open_cache(home.path.parent / member["entry"])
        head, member_record = load_head(cache, member["head"])
        voters.append((Member(cache, member["head"]), head, member_record["tap"]))
    return record, voters, normalized_weights(record["weights"], len(voters))


def cross_split_probabilities(home: Cache | str | Path, name: str, split: str) -> Voted:
    """A saved ensemble across entries on the rows of a cached split every member's entry holds."""
    home = home if isinstance(home, Cache) else open_cache(home)
    _, voters, weights = load_cross_ensemble(home, name)
    return vote(voters, weights, split)
