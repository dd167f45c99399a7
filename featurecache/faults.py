"""Fault injection for the crash tests: SIGKILL this process at a named point.

Test-only. With `FEATURECACHE_FAULT="<point>:<n>"` in the environment, the n-th time
(1-based, counted per process) that `fault_point("<point>")` is reached, the process
sends itself SIGKILL: no cleanup, no flush, no `finally`, exactly like an OOM kill or
a power cut seen from the file system. Unset (always, outside tests) it costs one
dictionary lookup: the variable is read once, on first use.

Points, in the order a shard meets them (see shards.py, shard_pipeline.py, store.py):
`after_lock` (entry lock held, nothing written yet), `shard_open` (temporary shard
created, no row written), `after_append` (rows written to the temporary file, shard
unfinished), `before_rename` (shard closed and fsynced under its temporary name),
`after_rename` (shard in place, not yet in the manifest), `before_manifest_rename`
(new manifest written to its temporary file), `after_manifest` (manifest lists the
shard), and `worker_load` (a DataLoader worker decoding an image). `export-features`
meets `export_split` (a split's files written in its temporary folder) and
`export_rename` (every file written and fsynced, before the folder's rename).
Under torchrun, `FEATURECACHE_FAULT_RANK=<rank>` limits the fault to that rank.
`FEATURECACHE_FAULT_PAUSE="<point>:<seconds>"` instead sleeps at every pass of a point,
so that a test can signal a run from outside at a known stage even on a loaded machine.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections import Counter

FAULT_ENV = "FEATURECACHE_FAULT"
FAULT_RANK_ENV = "FEATURECACHE_FAULT_RANK"
PAUSE_ENV = "FEATURECACHE_FAULT_PAUSE"
_reached: Counter[str] = Counter()


@functools.cache
def _target() -> tuple[str, int] | None:
    value = os.environ.get(FAULT_ENV, "")
    if not value:
        return None
    if os.environ.get(FAULT_RANK_ENV, os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return None
    name, _, count = value.partition(":")
    return name, int(count or 1)


@functools.cache
def _pause() -> tuple[str, float] | None:
    name, _, seconds = os.environ.get(PAUSE_ENV, "").partition(":")
    return (name, float(seconds or 0)) if name else None


def fault_point(name: str) -> None:
    """SIGKILL this process (or pause it) if the fault environment variables ask for it here."""
    pause = _pause()
    if pause is not None and pause[0] == name:
        time.sleep(pause[1])
    target = _target()
    if target is None or target[0] != name:
        return
    _reached[name] += 1
    if _reached[name] == target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
