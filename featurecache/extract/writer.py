"""Write planned shards on a background thread while the next batch computes.

The thread receives batches in order, routes each row to its planned shard, commits
a shard (temp file -> fsync -> rename) as soon as all of its images are accounted
for, and then rewrites the manifest atomically: the manifest only ever lists
complete shards.
"""

from __future__ import annotations

import errno
import json
import queue
import threading
from pathlib import Path

import numpy as np

from .engine import Batch
from ..errors import ExtractionError
from ..faults import fault_point
from .plan import Plan, PlannedShard
from ..cache.shards import ShardRows, ShardWriter, read_rows, shard_name
from ..data.sources import printable_path
from ..cache.layout import SHARDS_DIR, shard_file
from ..cache.manifest import add_shard, add_skipped, count_rows, mark_complete, start_from, tap_shapes, write_manifest

_DONE = object()


class ShardPipeline:
    def __init__(self, path: Path, manifest: dict, plan: Plan, spec, *, publish: bool = True) -> None:
        self.path, self.manifest, self.plan, self.spec = path, manifest, plan, spec
        self.publish = publish  # False on torchrun ranks other than 0: rank 0 alone writes the manifest
        self.tap_shapes = tap_shapes(manifest)
        start_from(manifest, plan.kept, plan.kept_skipped)
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._writer: ShardWriter | None = None
        self._shard_index = 0
        self._remaining = 0

    # -- manifest ---------------------------------------------------------------
    def _commit_manifest(self) -> None:
        if not self.publish:
            return
        count_rows(self.manifest, self.plan.splits)
        write_manifest(self.path, self.manifest)

    def _new_writer(self, split: str, number: int, capacity: int) -> ShardWriter:
        attrs = {"entry_id": self.manifest["entry_id"], "split": split, "skipped": "[]",
                 "featurecache_format": str(self.manifest["format_version"])}
        return ShardWriter(self.path / SHARDS_DIR / shard_name(split, number), tap_shapes=self.tap_shapes,
                           dtype=self.manifest["dtype"], attrs=attrs, capacity=capacity,
                           compression=self.spec.compression)

    def _commit_shard(self, writer: ShardWriter, split: str, skipped: list[dict]) -> None:
        record = {"file": shard_file(writer.final_path.name), "split": split, **writer.commit()}
        add_shard(self.manifest, record, skipped)
        self._commit_manifest()
        fault_point("after_manifest")

    def carry_over(self) -> None:
        """Rewrite shards that lost rows or whose labels moved, without the backbone."""
        for rewrite in self.plan.rewrites:
            record = rewrite.record
            rows = read_rows(self.path / record["file"], record["rows"], self.tap_shapes, rewrite.keep)
            samples = [self.plan.samples[f] for f in rows.fingerprints]
            rows.labels = np.array([s.label for s in samples], dtype=np.int64)
            rows.index = np.array([s.index for s in samples], dtype=np.int64)
            writer = self._new_writer(record["split"], rewrite.number, len(rows))
            try:
                writer.append(rows)
                self._commit_shard(writer, record["split"], [])
            except BaseException:
                writer.abort()
                raise
        self._commit_manifest()

    # -- background writing -------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="featurecache-writer", daemon=True)
        self._thread.start()

    def put(self, batch: Batch) -> None:
        while True:
            self._raise_writer_error()
            try:
                self._queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self.put(_DONE)
        self._thread.join()
        self._raise_writer_error()

    def abort(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, OSError) and (error.errno in (errno.ENOSPC, errno.EDQUOT)
                                               or "No space left" in str(error)):  # h5py keeps only the text
                raise ExtractionError(
                    f"disk full while writing a shard in {self.path} ({error.strerror or error}); no partial shard was "
                    "kept and earlier shards are intact. Free disk space, then rerun to resume") from error
            if isinstance(error, OSError):
                raise ExtractionError(
                    f"writing a shard failed ({error}); earlier shards are intact. "
                    "Free disk space if it is full, then rerun to resume") from error
            raise error

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    item = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                if item is _DONE:
                    return
                self._write(item)
        except BaseException as error:  # handed to the main thread by put()/close()
            self._error = error
        finally:
            if self._writer is not None:
                self._writer.abort()
                self._writer = None

    def _write(self, batch: Batch) -> None:
        samples = self.plan.to_compute
        row_of = {p: i for i, p in enumerate(batch.positions)}
        failures = dict(batch.failures)
        for position in sorted([*batch.positions, *failures]):
            shard = self._current_shard(position)
            if position in failures:
                sample = samples[position]
                self._skipped.append({"path": printable_path(sample.path), "split": sample.split,
                                      "reason": failures[position],
                                      "fingerprint": sample.fingerprint})
            else:
                self._pending.append(row_of[position])
            self._remaining -= 1
            if self._remaining == 0:
                self._flush_pending(batch)
                self._finish_shard(shard)
        self._flush_pending(batch)  # rows of a shard that continues in the next batch

    def _current_shard(self, position: int) -> PlannedShard:
        shard = self.plan.shards[self._shard_index]
        if self._remaining == 0:  # first row of a new shard
            assert shard.start == position, "batches must arrive in plan order"
            self._remaining = shard.stop - shard.start
            self._skipped: list[dict] = []
            self._pending: list[int] = []
            self._writer = None
        return shard

    def _flush_pending(self, batch: Batch) -> None:
        if not self._pending:
            return
        if self._writer is None:
            shard = self.plan.shards[self._shard_index]
            self._writer = self._new_writer(shard.split, shard.number, shard.stop - shard.start)
        samples = self.plan.to_compute
        chosen = [batch.positions[i] for i in self._pending]
        self._writer.append(ShardRows(
            features={tap: values[self._pending] for tap, values in batch.features.items()},
            labels=np.array([samples[p].label for p in chosen], dtype=np.int64),
            index=np.array([samples[p].index for p in chosen], dtype=np.int64),
            paths=[samples[p].path for p in chosen],
            fingerprints=[samples[p].fingerprint for p in chosen],
        ))
        self._pending = []

    def _finish_shard(self, shard: PlannedShard) -> None:
        if self._writer is not None:
            self._writer.file.attrs["skipped"] = json.dumps(self._skipped)
            self._commit_shard(self._writer, shard.split, self._skipped)
            self._writer = None
        else:  # every image of the shard failed: nothing to write, but record why
            add_skipped(self.manifest, self._skipped)
            self._commit_manifest()
        self._shard_index += 1

    # -- end ----------------------------------------------------------------------
    def finish(self) -> dict:
        # Rows in source order whatever produced the shards: a resumed, repaired or
        # distributed run lists its rows as an uninterrupted single process would.
        mark_complete(self.manifest, self.plan.canonical_order)
        self._commit_manifest()
        return self.manifest

    def remove_unreferenced(self) -> None:
        listed = {record["file"] for record in self.manifest["shards"]}
        for file in (self.path / SHARDS_DIR).glob("*.h5"):
            if shard_file(file.name) not in listed:
                file.unlink(missing_ok=True)
