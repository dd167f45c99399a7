"""Human-readable summaries of cache entries, for `featurecache ls` and `info`."""

from __future__ import annotations

from pathlib import Path

from ..errors import FeatureCacheError
from .manifest import fingerprint_kind, read_manifest
from .store import entry_size_bytes, list_entries, resolve_entry, shard_size_problem

#: How each crop mode resizes (timm's modes; none or center: the shorter side).
_RESIZE = {"squash": "both sides to ", "border": "longer side to "}


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _rows(manifest: dict) -> str:
    unlabeled = set(manifest.get("unlabeled_splits", []))
    return ", ".join(f"{split} {n}" + (" (unlabelled)" if split in unlabeled else "")
                     for split, n in manifest.get("splits", {}).items()) or "-"


def entry_rows(root: Path) -> list[tuple[str, ...]]:
    """One row per entry: name, source, model with input size and taps, weights, rows per split, size, state."""
    rows = []
    for path in list_entries(root):
        try:
            manifest = read_manifest(path)
        except FeatureCacheError as error:
            rows.append((path.name, "?", "?", "?", "?", human_bytes(entry_size_bytes(path)),
                         f"damaged: {error}"))
            continue
        config = manifest["config"]
        model = f"{config['arch']}\n{config['preprocessing'].get('crop_size', '?')} px\n{', '.join(manifest.get('taps', {}))}"
        rows.append((path.name, config["source"]["name"], model, manifest["weights"]["description"],
                     _rows(manifest), human_bytes(entry_size_bytes(path)),
                     _state(path, manifest)))
    return rows


def _state(path: Path, manifest: dict) -> str:
    """complete, incomplete, or damaged when a listed shard is missing or resized (a stat per shard)."""
    if not manifest.get("complete"):
        return "incomplete (rerun extract to resume)"
    problem = shard_size_problem(path, manifest)
    if problem:
        return f"damaged: shard {problem[0]} {problem[1]} (run featurecache verify --repair)"
    return "complete"


def _fingerprints(manifest: dict) -> str:
    kind = fingerprint_kind(manifest)
    if kind == "content":
        source_kind = str(manifest["config"]["source"].get("kind", ""))
        if source_kind in ("hf", "python:hf"):
            return "content (no files to stat: each row is identified by a hash of its encoded image bytes)"
        if source_kind == "arrays" or source_kind.startswith("python"):
            return "content (no files to stat: each row is identified by a hash of its pixels)"
        return "content (a hash of each file's bytes)"
    return "stat (each file's path, size and mtime)"


def describe_entry(name: str, root: Path | None = None) -> list[tuple[str, str]]:
    """(label, value) pairs describing one entry's manifest."""
    path = resolve_entry(name, root)
    manifest = read_manifest(path)
    config = manifest["config"]
    pre = config["preprocessing"]
    taps = ", ".join(f"{tap} {tuple(info['shape'])}" for tap, info in manifest["taps"].items())
    skipped = manifest.get("skipped", [])
    lines = [
        ("entry", str(path)),
        ("key", manifest["key"]),
        ("state", _state(path, manifest)),
        ("source", f"{config['source']['kind']} {config['source']['root']}"),
        ("fingerprints", _fingerprints(manifest)),
        ("model", config["arch"]),
        ("weights", f"{manifest['weights']['description']} (sha256 {manifest['weights']['sha256'][:16]}…)"),
        ("preprocessing", f"resize {_RESIZE.get(pre.get('crop_mode'), '')}{pre['resize_size']} ({pre['interpolation']}), "
                          f"{'pad with the mean colour, ' if pre.get('crop_mode') == 'border' else ''}centre crop {pre['crop_size']}"),
        ("taps", taps),
        ("storage", f"{manifest['dtype']}, forward in {config['precision']}"),
        ("classes", f"{len(manifest['classes'])}: {', '.join(manifest['classes'][:12])}"
                    + (" …" if len(manifest["classes"]) > 12 else "")),
        ("rows", _rows(manifest)),
        ("shards", str(len(manifest["shards"]))),
        ("skipped", str(len(skipped))),
        ("size", human_bytes(entry_size_bytes(path))),
        ("updated", str(manifest.get("updated", "?"))),
    ]
    lines += [("  skipped", f"{s['path']}: {s['reason']}") for s in skipped[:20]]
    from .views import summary_lines

    return lines + summary_lines(path, manifest["key"])
