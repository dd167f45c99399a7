"""Heads on disk: `heads/<name>/head.safetensors` (+ a readable `head.json` copy).

The safetensors file carries the tensors and, in its metadata, the whole head record
(config, cache key, metrics), sealed with a checksum (`featurecache.integrity`). It is
the one authoritative file and is replaced atomically, so a kill during a save keeps
the previous head. `head.json` is written after it for people and tools to read.

Every read validates the record against the schema (`featurecache.schema`) and checks
its checksum; loading the tensors checks their digest, refuses NaN or infinite values
and tensors of the wrong shape. A name is never taken silently: saving over an existing
head needs `overwrite`, and writes of one name are serialised by a lock. An ensemble
records the checksum of each member; once a member changes, the ensemble is stale and
refused until it is made again.

Reading records (`list_heads`, `read_record`, `leaderboard`) needs neither torch nor
scikit-learn, so `featurecache heads` answers at once; loading heads imports them.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

from ..errors import (CorruptCacheError, FeatureCacheError, HeadError, InvalidRecordError, MismatchError,
                     NameTakenError, StaleError)
from ..cache.atomic import remove_stale_temporaries, storage_error, write_json_atomic
from ..cache.integrity import CHECKSUM_KEY, non_finite, read_metadata, read_tensors, write_safetensors
from ..cache.schema import CROSS_ENSEMBLE, HEAD_NAME_PATTERN, check_head_record
from ..cache.layout import HEAD_FILE, HEAD_JSON, HEADS_DIR
from ..cache.store import Cache

if TYPE_CHECKING:
    from ..heads.registry import Head

RECORD_METADATA = "featurecache.head"
LOCK_TIMEOUT = 600.0


def head_dir(cache: Cache, name: str) -> Path:
    return cache.path / HEADS_DIR / name


def head_file(cache: Cache, name: str) -> Path:
    return head_dir(cache, name) / HEAD_FILE


def check_head_name(name: str, what: str = "head") -> str:
    if not isinstance(name, str) or not re.fullmatch(HEAD_NAME_PATTERN, name):
        raise HeadError(f"bad {what} name {name!r}; use up to 100 letters, digits, '_', '-', '.' or '+', "
                        "starting with a letter or digit")
    return name


def default_head_name(head_type: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", head_type.replace("sklearn:", "sklearn-"))


def head_exists(cache: Cache, name: str) -> bool:
    return head_file(cache, name).exists()


def refuse_taken(cache: Cache, name: str, overwrite: bool) -> None:
    """NameTakenError when `name` is a head already and `overwrite` is not given."""
    if not overwrite and head_exists(cache, name):
        raise NameTakenError(f"a head named {name!r} already exists on {cache.path.name}; pass --overwrite to "
                             "replace it, or choose another --name")


@contextlib.contextmanager
def head_lock(cache: Cache, name: str) -> Iterator[None]:
    """Serialise writes of one head name (two concurrent fits leave one consistent head)."""
    folder = cache.path / HEADS_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / f".{name}.lock"), timeout=LOCK_TIMEOUT)
        lock.acquire()
    except Timeout:
        raise HeadError(f"another featurecache process is writing head {name!r}; wait for it, then rerun") from None
    except OSError as error:
        raise storage_error(error, folder, "the heads folder") from None
    try:
        yield
    finally:
        lock.release()


def save_head(cache: Cache, name: str, head: Head, record: dict, *, overwrite: bool = False) -> Path:
    """Write the head atomically; `record` is stored in the file and as head.json.

    Refuses an existing name unless `overwrite`, a head holding NaN or infinite values,
    and a record the schema would refuse on reading."""
    check_head_name(name)
    directory = head_dir(cache, name)
    final = directory / HEAD_FILE
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.to_tensors().items()}
    bad = non_finite(tensors)
    if bad:
        raise HeadError(f"the fitted head {name!r} holds NaN or infinite values (in {bad[0]}): the fit diverged; "
                        "try other parameters (e.g. a smaller learning rate or a stronger regularisation)")
    record = {**record, "name": name, "config": head.to_config()}
    check_head_record(record, final)
    try:
        text = json.dumps(record, allow_nan=True)
    except (TypeError, ValueError) as error:
        raise HeadError(f"the record of head {name!r} cannot be stored ({error})") from None
    with head_lock(cache, name):
        refuse_taken(cache, name, overwrite)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise storage_error(error, directory, "the head folder") from None
        remove_stale_temporaries(directory)
        write_safetensors(final, tensors, {RECORD_METADATA: text}, "the head")
        write_json_atomic(directory / HEAD_JSON, record, "the head's copy")
    return directory


def _advice(name: str) -> str:
    return f"fit head {name!r} again (with --overwrite), or delete its folder"


def read_record_with_checksum(cache: Cache, name: str) -> tuple[dict, str]:
    """A head's record, validated and checked, and the checksum that identifies this version of it."""
    check_head_name(name)
    path = head_file(cache, name)
    if not path.exists():
        known = ", ".join(list_heads(cache)) or "none yet"
        raise HeadError(f"no head {name!r} on {cache.path.name} (heads: {known}); fit one with featurecache fit-head")
    try:
        metadata = read_metadata(path, "head file", _advice(name))
    except FileNotFoundError:
        raise HeadError(f"head {name!r} disappeared while being read; rerun") from None
    try:
        record = json.loads(metadata[RECORD_METADATA])
    except (KeyError, json.JSONDecodeError, RecursionError) as error:
        raise CorruptCacheError(f"head file {path} holds no readable record ({error}); {_advice(name)}") from None
    check_head_record(record, path)
    if record["name"] != name:
        raise InvalidRecordError(f"{path}: field name: {record['name']!r} differs from its folder {name!r}; "
                                 f"{_advice(name)}")
    return record, metadata[CHECKSUM_KEY]


def read_record(cache: Cache, name: str) -> dict:
    return read_record_with_checksum(cache, name)[0]


def stale_members(cache: Cache, record: dict, current: dict[str, str | None] | None = None) -> list[str]:
    """The members of an ensemble that changed (or vanished) since it was made; [] for other heads.
    `current`: the members' checksums as `member_checksums` read them, else they are read here."""
    if record.get("head") == CROSS_ENSEMBLE:
        return cross_member_changes(cache, record)
    if record.get("head") != "ensemble":
        return []
    recorded = record.get("member_checksums")
    if recorded is None:
        return list(record["members"])  # made before members were tracked: cannot tell, so stale
    if current is None:
        current = member_checksums(cache, record["members"], damage_raises=False)
    return [member for member in record["members"]
            if current[member] is None or recorded.get(member) != current[member]]


def member_checksums(cache: Cache, members: Sequence[str], *, damage_raises: bool) -> dict[str, str | None]:
    """Each member's current checksum, None where it vanished or cannot be read. With
    `damage_raises`, a damaged member raises its own error (refit it) instead."""
    current: dict[str, str | None] = {}
    for member in members:
        try:
            current[member] = read_record_with_checksum(cache, member)[1]
        except (CorruptCacheError, InvalidRecordError):
            if damage_raises:
                raise
            current[member] = None
        except FeatureCacheError:
            current[member] = None
    return current


def cross_member_changes(cache: Cache, record: dict) -> list[str]:
    """The members of an ensemble across entries that changed since it was made, each with what changed:
    its entry deleted or extracted again (another cache key), its head refitted or removed."""
    from ..cache.store import open_cache

    changed = []
    for member in record["cross_members"]:
        label = f"{member['entry']}:{member['head']}"
        try:
            other = cache if member["entry"] == cache.path.name else open_cache(cache.path.parent / member["entry"])
        except FeatureCacheError:
            changed.append(f"{label} (its entry is gone or unreadable)")
            continue
        if other.key != member["cache_key"]:
            changed.append(f"{label} (its entry was extracted again)")
            continue
        try:
            current = read_record_with_checksum(other, member["head"])[1]
        except FeatureCacheError:
            changed.append(f"{label} (the head is gone or unreadable)")
            continue
        if current != member["checksum"]:
            changed.append(f"{label} (the head was fitted again)")
    return changed


def remake_command(cache: Cache, name: str, record: dict) -> str:
    """The `featurecache ensemble` command that makes ensemble `name` again: its members and its weights."""
    if record["head"] == CROSS_ENSEMBLE:
        members = [m["head"] if m["entry"] == cache.path.name else f"{m['entry']}:{m['head']}"
                   for m in record["cross_members"]]
    else:
        members = list(record["members"])
    weights = record.get("weights") or []
    shown = "" if len(set(weights)) <= 1 else f" --weights {','.join(f'{w:g}' for w in weights)}"
    return f"featurecache ensemble {cache.path.name} {' '.join(members)} --name {name}{shown} --overwrite"


def stale_error(cache: Cache, name: str, record: dict, changed: str) -> StaleError:
    return StaleError(f"ensemble {name!r} is stale: its member {changed} changed after it was made, so its figures "
                      f"no longer describe it; make it again with {remake_command(cache, name, record)}")


def member_names(cache: Cache, name: str, _seen: tuple[str, ...] = ()) -> set[str]:
    """Every head an ensemble depends on, directly or through other ensembles."""
    if name in _seen:
        raise InvalidRecordError(f"ensemble {name!r} contains itself (through {' -> '.join(_seen)}); "
                                 "make it again with featurecache ensemble --overwrite")
    record = read_record(cache, name)
    names: set[str] = set()
    for member in record.get("members") or []:
        names.add(member)
        names |= member_names(cache, member, (*_seen, name))
    return names


def load_head(cache: Cache, name: str, _seen: tuple[str, ...] = ()) -> tuple[Head, dict]:
    """Rebuild a fitted head, refusing one trained on other features than this cache's,
    a damaged one, and a stale ensemble."""
    from ..heads.registry import head_from_saved
    from ..cache.streaming import bank_reader

    if name in _seen:
        raise InvalidRecordError(f"ensemble {_seen[0]!r} contains itself (through {' -> '.join((*_seen, name))}); "
                                 "make it again with featurecache ensemble --overwrite")
    record, _ = read_record_with_checksum(cache, name)
    if record["head"] == CROSS_ENSEMBLE:
        entries = ", ".join(f"{m['entry']}:{m['head']}" for m in record["cross_members"])
        raise MismatchError(f"head {name!r} votes across cache entries ({entries}), so it cannot run on the features "
                            f"of {cache.path.name} alone; use it with featurecache predict (images or --split), or "
                            "choose a head of one entry")
    if record["cache_key"] != cache.key:
        raise MismatchError(
            f"head {name!r} was fitted on other features (cache key {record['cache_key'][:12]}, "
            f"this cache is {cache.key[:12]}); fit it again with featurecache fit-head --overwrite")
    tap = record["tap"]
    if tap not in cache.tap_shapes or record["config"]["n_features"] != _width(cache, tap):
        raise MismatchError(f"head {name!r} expects {record['config']['n_features']} features of tap {tap!r}, "
                            f"which this cache does not have")
    if record["config"]["n_classes"] != len(cache.classes):
        raise MismatchError(f"head {name!r} has {record['config']['n_classes']} classes, this cache "
                            f"{len(cache.classes)}; fit it again with featurecache fit-head --overwrite")
    if list(record["classes"]) != list(cache.classes):  # same count, other names or order: every label would be wrong
        raise MismatchError(f"head {name!r} was fitted with the classes in another order or with other names "
                            f"({_first_difference(record['classes'], cache.classes)}), so its predictions would be "
                            "named wrongly; if the cache's class list was edited, extract the entry again, else fit "
                            "the head again with featurecache fit-head --overwrite")
    members = None
    if record["head"] == "ensemble":
        # a damaged member is named as damaged (refit it), not as changed
        changed = stale_members(cache, record, member_checksums(cache, record["members"], damage_raises=True))
        if changed:
            raise stale_error(cache, name, record, repr(changed[0]))
        members = [load_head(cache, member, (*_seen, name))[0] for member in record["members"]]
    path = head_file(cache, name)
    try:
        metadata = read_metadata(path, "head file", _advice(name))
        tensors = read_tensors(path, metadata, "head file", _advice(name))
    except FileNotFoundError:
        raise HeadError(f"head {name!r} disappeared while being read; rerun") from None
    try:
        head = head_from_saved(record["config"], tensors, members=members)
    except FeatureCacheError as error:
        raise CorruptCacheError(f"head file {path} does not hold a valid {record['head']} head ({error}); "
                                f"{_advice(name)}") from None
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        raise CorruptCacheError(f"head file {path} does not hold a valid {record['head']} head "
                                f"({type(error).__name__}: {str(error)[:160]}); {_advice(name)}") from None
    source = getattr(head, "bank_source_", None)
    if source:  # a streamed knn head searches this cache's shards (the key check above ties them)
        if not isinstance(source, dict) or source.get("split") not in cache.splits or source.get("tap") != tap:
            raise CorruptCacheError(f"head file {path}: its bank_source_ {source!r} names no split and tap of "
                                    f"this cache; {_advice(name)}")
        head.bank_reader_ = bank_reader(cache, source["split"], source["tap"])
    return head, record


def _width(cache: Cache, tap: str) -> int:
    size = 1
    for dimension in cache.tap_shapes[tap]:
        size *= dimension
    return size


def list_heads(cache: Cache) -> list[str]:
    root = cache.path / HEADS_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if re.fullmatch(HEAD_NAME_PATTERN, p.name) and (p / HEAD_FILE).exists())


def _headless(cache: Cache) -> list[str]:
    """Head folders that hold a head.json but no head file (or only a dangling link to one)."""
    root = cache.path / HEADS_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if re.fullmatch(HEAD_NAME_PATTERN, p.name)
                  and (p / HEAD_JSON).exists() and not (p / HEAD_FILE).exists())


def views_label(views: object) -> str:
    """What a head record says of augmented views: "-" for none, else how many and how used."""
    if not isinstance(views, dict) or not views.get("views"):
        return "-" if not isinstance(views, dict) else "no (plain features)"
    how = {"sample": "1 drawn per epoch", "stack": "stacked", "mean": "mean"}.get(views.get("mode"), "?")
    return f"{views['views']} {views.get('augment', '')} ({how})"


def _first_difference(recorded: list[str], current: list[str]) -> str:
    index = next(i for i, (a, b) in enumerate(zip(recorded, current)) if a != b)
    return f"class {index} is {recorded[index]!r} in the head, {current[index]!r} in the cache"


def leaderboard(cache: Cache | str | Path) -> list[dict]:
    """Every head on the cache with its headline figure, best first; stale ones, then damaged ones last
    (reads records only). A head whose record cannot be read is a row with `damaged` saying why, so one
    damaged head does not hide the others."""
    from ..cache.store import open_cache

    cache = cache if isinstance(cache, Cache) else open_cache(cache)

    def damaged(name: str, why: str) -> dict:
        return {"name": name, "head": "", "tap": "", "split": "", "top1": None, "top5": None, "val_top1": None,
                "chosen": None, "fit_seconds": None, "stale": True, "note": "", "views": "", "entries": [],
                "left_out": {}, "carved_apart": {}, "damaged": why}

    # head.json is written after the head file: a folder with it and without the file lost its head
    rows = [damaged(name, f"its {HEAD_FILE} is missing; {_advice(name)}") for name in _headless(cache)]
    for name in list_heads(cache):
        try:
            record = read_record(cache, name)
        except CorruptCacheError as error:
            rows.append(damaged(name, str(error)))
            continue
        split = record["headline"]["split"]
        metrics = record["metrics"].get(split)
        metrics = metrics if isinstance(metrics, dict) else {}
        stale = (record["cache_key"] != cache.key or list(record["classes"]) != list(cache.classes)
                 or bool(stale_members(cache, record)))
        rows.append({
            "name": name, "head": record["head"], "tap": record["tap"], "split": split,
            "top1": metrics.get("top1"), "top5": metrics.get("top5"),
            "val_top1": next((m.get("top1") for s, m in record["metrics"].items() if s.startswith("val")), None),
            "chosen": record.get("chosen"), "fit_seconds": record.get("fit_seconds", 0.0),
            "stale": stale, "note": record["headline"].get("note", ""), "views": views_label(record.get("views")),
            "entries": [f"{m['entry']}:{m['head']}" for m in record.get("cross_members") or []],
            "left_out": {split: part["left_out"] for split, part in (record.get("alignment") or {}).items()
                         if part["left_out"]},
            "carved_apart": {split: part["carved_into_training"] for split, part in (record.get("alignment") or {}).items()
                             if part.get("carved_into_training")},  # of left_out: a member trained on them
            "damaged": "",
        })
    return sorted(rows, key=lambda r: (bool(r["damaged"]), r["stale"], -(r["top1"] or 0.0)))
