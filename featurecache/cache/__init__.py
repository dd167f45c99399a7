"""The cache: entry layout and names, key, manifest, lock, atomic writes, HDF5 shards, summaries."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"Cache": "store", "open_cache": "store", "default_root": "store", "resolve_entry": "store"})
