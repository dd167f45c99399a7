"""3. Cache read throughput: all features of an entry vs np.load of the same array."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np

from featurecache.cache.shards import ShardRows, ShardWriter, shard_name
from featurecache.cache.store import open_cache, write_manifest

from .common import Config, Row, interleaved

SHARD_ROWS = 4096  # ExtractSpec.shard_size's default


def synthetic_features(rows: int, dim: int = 2048, seed: int = 0) -> np.ndarray:
    """Non-negative, sparse-ish values like pooled ReLU features (incompressible noise otherwise)."""
    rng = np.random.default_rng(seed)
    values = rng.gamma(0.6, 0.5, (rows, dim)).astype(np.float32)
    values[rng.random((rows, dim)) < 0.1] = 0.0  # pooled ReLU outputs: some exact zeros
    return values


def write_entry(path: Path, features: np.ndarray, *, dtype: str = "float16", compression: str | None = None,
                batch: int = 64) -> Path:
    """A cache entry as extract writes it (ShardWriter, batches of `batch` rows, a manifest)."""
    return write_splits(path, {"train": (features, np.zeros(len(features), np.int64))}, ["a"], dtype=dtype,
                        compression=compression, batch=batch)


def write_splits(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str], *,
                 dtype: str = "float16", compression: str | None = None, batch: int = 64) -> Path:
    """`write_entry` with several splits of (features, labels) and named classes."""
    (path / "shards").mkdir(parents=True, exist_ok=True)
    shards = []
    for split, (features, labels) in splits.items():
        for number, start in enumerate(range(0, len(features), SHARD_ROWS)):
            part = features[start:start + SHARD_ROWS].astype(dtype)
            writer = ShardWriter(path / "shards" / shard_name(split, number), tap_shapes={"pool": part.shape[1:]},
                                 dtype=dtype, attrs={"split": split}, capacity=len(part), compression=compression)
            for offset in range(0, len(part), batch):
                rows = part[offset:offset + batch]
                n, first = len(rows), start + offset
                writer.append(ShardRows({"pool": rows}, labels[first:first + n].astype(np.int64), np.arange(n),
                                        [f"x/{i}" for i in range(n)], [f"{first + i:032d}" for i in range(n)]))
            shards.append({"file": f"shards/{shard_name(split, number)}", "split": split, **writer.commit()})
    first_features = next(iter(splits.values()))[0]
    # Every field the manifest schema wants; the weights are named but never loaded.
    weights = hashlib.sha256(b"benchmark weights").hexdigest()
    preprocessing = {"resize_size": 256, "crop_size": 224, "interpolation": "bilinear",
                     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    manifest = {
        "format_version": 1, "tool_version": "benchmark", "entry_id": hashlib.sha256(str(path).encode()).hexdigest(),
        "key": hashlib.sha256(f"benchmark {path}".encode()).hexdigest(), "complete": True,
        "config": {"arch": "resnet50", "weights_sha256": weights, "taps": ["pool"], "preprocessing": preprocessing,
                   "dtype": dtype, "precision": "fp32", "source": {"kind": "benchmark", "name": path.name,
                                                                  "root": str(path)}, "fingerprint": "stat"},
        "weights": {"spec": "random", "description": "benchmark (synthetic features)", "sha256": weights,
                    "file": f"../_weights/{weights}.safetensors"},
        "spec": {"source": str(path), "model": "resnet50", "weights": "random", "taps": ["pool"], "dtype": dtype},
        "classes": list(classes), "dtype": dtype, "taps": {"pool": {"shape": list(first_features.shape[1:])}},
        "created": "benchmark", "splits": {split: len(features) for split, (features, _) in splits.items()},
        "shards": shards, "skipped": []}
    write_manifest(path, manifest)
    return path


def entry_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in (path / "shards").glob("*.h5"))


def run(config: Config) -> list[Row]:
    features = synthetic_features(config.read_rows)
    rows = []
    for dtype in ("float16", "float32"):
        entry = write_entry(config.workdir / f"read-{dtype}", features, dtype=dtype)
        npy = config.workdir / f"read-{dtype}.npy"
        np.save(npy, features.astype(dtype))
        cache = open_cache(entry)
        gigabytes = features.size * np.dtype(dtype).itemsize / 1e9
        candidates = {"npy": lambda: np.load(npy), "ours": lambda: cache.features("train")}
        # Layout variants, read with plain h5py: what the chunking and checksum cost.
        variants = {"contiguous": {}, "chunk 1 MiB": {"fletcher32": False}, "chunk 1 MiB + fletcher32": {"fletcher32": True}}
        for name, options in variants.items():
            file = config.workdir / f"read-{dtype}-{name.replace(' ', '_')}.h5"
            with h5py.File(file, "w") as handle:
                data = features.astype(dtype)
                if options:
                    chunk_rows = min(len(data), max(1, (1 << 20) // (data.itemsize * data.shape[1])))
                    handle.create_dataset("x", data=data, chunks=(chunk_rows, data.shape[1]), **options)
                else:
                    handle.create_dataset("x", data=data)
            candidates[name] = lambda file=file: _read_h5(file)
        # Reads take tens of ms and a shared machine's load moves them by up to 2x: many
        # interleaved repeats, cheap here, steady the medians.
        seconds = interleaved(candidates, repeats=max(15, config.repeats), warmup=2)
        rate = {name: gigabytes / s for name, s in seconds.items()}
        rows.append(Row("3", f"read all features, {dtype} ({config.read_rows:,} x 2048)", rate["ours"], rate["npy"],
                        "GB/s", target=">= 1.0x", note="Cache.features vs np.load (page cache warm)"))
        for name in variants:
            rows.append(Row("3", f"  h5py {name}, {dtype}", rate[name], rate["npy"], "GB/s", note="vs np.load"))
    return rows


def _read_h5(file: Path) -> np.ndarray:
    with h5py.File(file, "r") as handle:
        return handle["x"][:]


def five_processes_main(argv: list[str]) -> None:
    """`python -m benchmarks.read DIR [ROWS]`: Cache.features vs np.load in this process,
    float16 and float32, on an entry kept in DIR (written on the first call), so that
    several processes in a row measure the read alone."""
    workdir = Path(argv[0])
    count = int(argv[1]) if len(argv) > 1 else 30_000
    for dtype in ("float16", "float32"):
        entry, npy = workdir / f"read-{dtype}-{count}", workdir / f"read-{dtype}-{count}.npy"
        if not npy.exists():
            features = synthetic_features(count)
            write_entry(entry, features, dtype=dtype)
            np.save(npy, features.astype(dtype))
        cache = open_cache(entry)
        seconds = interleaved({"npy": lambda: np.load(npy), "ours": lambda: cache.features("train")},
                              repeats=15, warmup=2)
        gigabytes = count * 2048 * np.dtype(dtype).itemsize / 1e9
        print(f"{dtype}: ours {gigabytes / seconds['ours']:.2f} GB/s, np.load {gigabytes / seconds['npy']:.2f} GB/s, "
              f"ratio {seconds['npy'] / seconds['ours']:.2f}x (median of 15, interleaved)")


if __name__ == "__main__":
    import sys

    five_processes_main(sys.argv[1:])
