"""Heads on disk: `heads/<name>/head.safetensors` (+ a readable `head.json` copy).

The safetensors file carries the tensors and, in its metadata, the whole head record
(config, cache key, metrics). It is the one authoritative file and is replaced
atomically, so a kill during a save keeps the previous head. `head.json` is written
after it for people and tools to read.

Reading records (`list_heads`, `read_record`, `leaderboard`) needs neither torch nor
scikit-learn, so `featurecache heads` answers at once; saving and loading heads
import them when called.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from .errors import HeadError, MismatchError
from .shards import fsync_directory
from .store import Cache, open_cache, write_json_atomic

if TYPE_CHECKING:
    from .heads import Head

RECORD_METADATA = "featurecache.head"
HEADS_DIR = "heads"


def head_dir(cache: Cache, name: str) -> Path:
    return cache.path / HEADS_DIR / name


def check_head_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}", name):
        raise HeadError(f"bad head name {name!r}; use letters, digits, '_', '-', '.' or '+'")
    return name


def default_head_name(head_type: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", head_type.replace("sklearn:", "sklearn-"))


def save_head(cache: Cache, name: str, head: Head, record: dict) -> Path:
    """Write the head atomically; `record` is stored in the file and as head.json."""
    from safetensors.torch import save_file
    directory = head_dir(cache, check_head_name(name))
    directory.mkdir(parents=True, exist_ok=True)
    record = {**record, "name": name, "config": head.to_config()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.to_tensors().items()}
    final = directory / "head.safetensors"
    tmp = directory / f".head.safetensors.tmp-{os.getpid()}"
    try:
        save_file(tensors, str(tmp), metadata={RECORD_METADATA: json.dumps(record)})
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        fsync_directory(directory)
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic(directory / "head.json", record)
    return directory


def read_record(cache: Cache, name: str) -> dict:
    path = head_dir(cache, name) / "head.safetensors"
    if not path.exists():
        known = ", ".join(list_heads(cache)) or "none yet"
        raise HeadError(f"no head {name!r} on {cache.path.name} (heads: {known}); fit one with featurecache fit-head")
    try:
        return json.loads(_safetensors_metadata(path)[RECORD_METADATA])
    except (ValueError, OSError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise HeadError(f"head file {path} is unreadable ({error}); fit the head again") from None


def _safetensors_metadata(path: Path) -> dict:
    """The `__metadata__` of a safetensors file, read from its header alone.

    The format: an 8-byte little-endian header length N, N bytes of JSON (tensor names to
    dtype, shape and data_offsets, plus `__metadata__`), then the data. Read directly, as
    safetensors' own reader would import numpy or torch; the same checks as its reader:
    the header parses and the data ends exactly at the end of the file (not truncated).
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length > size - 8 or length > 100 << 20:
            raise ValueError(f"header length {length} does not fit a {size}-byte file")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    end = max((int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise ValueError(f"data ends at byte {8 + length + end}, the file has {size} (truncated or padded)")
    return header.get("__metadata__") or {}


def load_head(cache: Cache, name: str) -> tuple[Head, dict]:
    """Rebuild a fitted head, refusing one trained on other features than this cache's."""
    from safetensors.torch import load_file

    from .heads import head_from_saved
    from .streaming import bank_reader

    record = read_record(cache, name)
    if record.get("cache_key") != cache.key:
        raise MismatchError(
            f"head {name!r} was fitted on other features (cache key {str(record.get('cache_key'))[:12]}, "
            f"this cache is {cache.key[:12]}); fit it again with featurecache fit-head")
    tap = record.get("tap", "pool")
    if tap not in cache.tap_shapes or record["config"].get("n_features") not in (None, _width(cache, tap)):
        raise MismatchError(f"head {name!r} expects {record['config'].get('n_features')} features of tap {tap!r}, "
                            f"which this cache does not have")
    members = None
    if record["config"].get("head") == "ensemble":
        members = [load_head(cache, member)[0] for member in record["config"]["params"]["members"]]
    try:
        tensors = load_file(str(head_dir(cache, name) / "head.safetensors"))
    except (SafetensorError, OSError) as error:
        raise HeadError(f"head {name!r} is unreadable ({error}); fit it again") from None
    head = head_from_saved(record["config"], tensors, members=members)
    source = getattr(head, "bank_source_", None)
    if source:  # a streamed knn head searches this cache's shards (the key check above ties them)
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
    return sorted(p.name for p in root.iterdir() if (p / "head.safetensors").exists())


def leaderboard(cache: Cache | str | Path) -> list[dict]:
    """Every head on the cache with its headline figure, best first (reads records only)."""
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    rows = []
    for name in list_heads(cache):
        record = read_record(cache, name)
        split = record["headline"]["split"]
        metrics = record["metrics"].get(split, {})
        rows.append({
            "name": name, "head": record["head"], "tap": record["tap"], "split": split,
            "top1": metrics.get("top1"), "top5": metrics.get("top5"),
            "val_top1": next((m["top1"] for s, m in record["metrics"].items() if s.startswith("val")), None),
            "chosen": record.get("chosen"), "fit_seconds": record.get("fit_seconds", 0.0),
            "stale": record.get("cache_key") != cache.key, "note": record["headline"].get("note", ""),
        })
    return sorted(rows, key=lambda r: (r["stale"], -(r["top1"] or 0.0)))
