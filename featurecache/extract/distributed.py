"""Distributed extraction: the same `extract`, one process per device, under torchrun.

`torchrun --nproc-per-node N -m featurecache extract ...` starts N processes with RANK,
WORLD_SIZE and LOCAL_RANK in their environment. Each binds its own device
(cuda:LOCAL_RANK with NCCL, or the CPU with gloo). Rank 0 alone takes the entry lock,
cleans up and plans, then shares the plan; planned shard i goes to rank
i % WORLD_SIZE, so the parts are disjoint, deterministic and unpadded, and every batch
is the one a single process would run (features are bitwise the same). Each rank
writes its own shard files (temporary file, fsync, rename); only rank 0 writes the
manifest. After every rank is done, rank 0 checks the other ranks' shards against the
checksums their writers computed, lists them in plan order and publishes the manifest.

A killed rank loses only its unfinished shard: torchrun stops the others, and the
rerun, with any world size, adopts every complete shard file (see plan.py).
Outside torchrun the group is one rank of one and every method is a no-op.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..device import resolve_device
from ..errors import CorruptCacheError, ExtractionError
from .plan import Plan
from ..cache.manifest import replace_part
from ..cache.shards import file_sha256
from ..data.sources import Source


@dataclass
class Group:
    """This process's place among the processes of one extract run."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False  # we initialised torch.distributed, so we tear it down

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, value):
        """Rank 0's `value`, on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order, on every rank; also a barrier."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def share_plan(self, key: str, hit: dict | None, plan: Plan | None, source: Source) -> tuple[dict | None, Plan | None]:
        """Rank 0's decision (a cache hit's manifest, or its plan) on every rank.

        Only the work to do travels (fingerprints and the shard layout); each rank
        rebuilds the samples from its own view of the source, which must be the same.
        """
        if self.world_size == 1:
            return hit, plan
        outline = None if plan is None else (plan.splits, [s.fingerprint for s in plan.to_compute], plan.shards)
        summary = hit and {"splits": hit["splits"], "skipped": hit["skipped"]}
        leader_key, summary, outline = self.share((key, summary, outline))
        if leader_key != key:
            raise ExtractionError(f"rank {self.rank} sees other files than rank 0 (cache key {key[:12]} vs "
                                  f"{leader_key[:12]}); every node must read the same source and cache root "
                                  "on a shared file system")
        if self.leader or summary:
            return hit or summary, plan
        splits, fingerprints, shards = outline
        samples = {s.fingerprint: s for s in source.samples}
        return None, Plan(samples=samples, splits=splits, to_compute=[samples[f] for f in fingerprints],
                          shards=shards)

    def assign(self, plan: Plan) -> Plan:
        """This rank's part of the plan: planned shard i goes to rank i % world_size."""
        return dataclasses.replace(plan, shards=plan.shards[self.rank :: self.world_size])

    def collect(self, pipeline, computed: int) -> int:
        """Wait for every rank; rank 0 checks the others' shards and lists them all, in plan order.

        Returns the number of images every rank computed together.
        """
        if self.world_size == 1:
            return computed
        plan, manifest = pipeline.plan, pipeline.manifest
        planned = {shard.file for shard in plan.shards}
        position = {s.fingerprint: i for i, s in enumerate(plan.to_compute)}
        mine = ([r for r in manifest["shards"] if r["file"] in planned],
                [s for s in manifest["skipped"] if s["fingerprint"] in position], computed)
        parts = self.gather(mine)
        if self.leader:
            for records, _, _ in parts[1:]:
                for record in records:
                    _check_written(pipeline.path, record)
            new_shards = plan.canonical_order([r for records, _, _ in parts for r in records])
            new_skipped = sorted((s for _, skipped, _ in parts for s in skipped),
                                 key=lambda s: position[s["fingerprint"]])
            replace_part(manifest, planned, position, new_shards, new_skipped)
        return sum(count for _, _, count in parts)

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def _check_written(entry_path, record: dict) -> None:
    """A shard another rank wrote is in place, with the size and SHA-256 its writer computed."""
    file = entry_path / record["file"]
    if not file.is_file() or file.stat().st_size != record["bytes"] or file_sha256(file) != record["sha256"]:
        raise CorruptCacheError(f"shard {file} differs from what its rank wrote (a shared file system that "
                                "lost or changed it?); rerun the same command to recompute it")


def _cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def join_group(device: str) -> Group:
    """Join the torchrun job this process belongs to, if any, and bind its device.

    Detected from WORLD_SIZE/RANK/LOCAL_RANK (set by torchrun); a world of one, or no
    torchrun, is a single process on `device` as usual.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = resolve_device(device)
    if world_size <= 1:
        return Group(chosen)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    else:
        # torchrun sets OMP_NUM_THREADS=1; give each rank on this node its share of the cores instead.
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, _cpu_cores() // local_world_size))
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Group(chosen, rank, world_size, owns)


def launch_command(argv: list[str], devices: int) -> list[str]:
    """The torchrun command that runs `featurecache ARGV` (without --devices) on `devices` local processes."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--devices":
            skip = True
        elif not arg.startswith("--devices="):
            rest.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
            "-m", "featurecache", *rest]
