"""5. Storage: bytes per image and read speed for float16/float32 and compression."""

from __future__ import annotations


from featurecache.cache.store import open_cache

from .common import Config, Row, interleaved
from .read import entry_bytes, synthetic_features, write_entry


def run(config: Config) -> list[Row]:
    features = synthetic_features(max(64, config.read_rows // 3))
    rows, readers, sizes = [], {}, {}
    for dtype in ("float16", "float32"):
        for compression in (None, "lzf", "gzip"):
            name = f"{dtype} {compression or 'none'}"
            entry = write_entry(config.workdir / f"storage-{name.replace(' ', '-')}", features, dtype=dtype,
                                compression=compression)
            sizes[name] = entry_bytes(entry) / len(features)
            readers[name] = lambda cache=open_cache(entry): cache.features("train")
    seconds = interleaved(readers, repeats=max(3, config.repeats), warmup=1)
    base = "float16 none"
    for name in readers:
        rate = len(features) / seconds[name]
        rows.append(Row("5", f"{name}: bytes/image", sizes[name], sizes[base], "B", higher_is_better=False,
                        note=f"read {rate / 1e3:,.0f}k rows/s = {seconds[base] / seconds[name]:.2f}x of float16 none"))
    return rows
