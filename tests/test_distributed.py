"""Distributed extraction: `featurecache extract` under torchrun, two gloo ranks on the CPU.

The entry two ranks make is the entry one process makes: same key, rows, skipped
list, and bitwise the same fp32 features. A rank killed mid-run loses only its
unfinished shard; a rerun with another world size adopts the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from featurecache import extract, open_cache
from featurecache.extract.distributed import launch_command

from helpers import replace_spec

TORCHRUN_TIMEOUT = 300  # two ranks each import torch: slow on a busy machine, not a hang


@pytest.fixture
def photos(image_folder) -> Path:
    """The image folder plus an unreadable image, which lands in a shard of rank 1."""
    (image_folder / "val" / "ants" / "ants_9.png").write_bytes(b"not an image")
    return image_folder


def torchrun(tmp_path: Path, source: Path, root: Path, ranks: int, **env: str) -> subprocess.CompletedProcess:
    command = launch_command([
        "extract", str(source), "--model", "resnet18", "--weights", "random", "--image-size", "32",
        "--precision", "fp32", "--dtype", "float32", "--workers", "0", "--shard-size", "4",
        "--batch-size", "4", "--root", str(root), "--devices", str(ranks)], ranks)
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environment.update(FEATURECACHE_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="200", **env)
    return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True,
                          timeout=TORCHRUN_TIMEOUT)


def only_entry(root: Path) -> Path:
    entries = [p for p in root.iterdir() if p.is_dir() and p.name != "_weights"]
    assert len(entries) == 1, entries
    return entries[0]


def assert_same_entry(entry: Path, reference: Path) -> None:
    """Same key, rows in the same order, skipped list and bitwise features."""
    got, expected = open_cache(entry), open_cache(reference)
    assert got.key == expected.key
    assert got.splits == expected.splits
    assert sorted(s["path"] for s in got.manifest["skipped"]) == sorted(s["path"] for s in expected.manifest["skipped"])
    for split in expected.splits:
        assert len(set(got.paths(split))) == len(got.paths(split)), "duplicated rows"
        assert got.paths(split) == expected.paths(split)
        np.testing.assert_array_equal(got.labels(split), expected.labels(split))
        np.testing.assert_array_equal(got.index(split), expected.index(split))
        assert got.features(split).tobytes() == expected.features(split).tobytes(), f"{split} differs bitwise"


def test_launch_command_reruns_the_same_arguments_under_torchrun():
    command = launch_command(["-v", "extract", "photos", "--devices", "4", "--devices=4", "--shard-size", "8"], 4)
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                           "-m", "featurecache", "-v", "extract", "photos", "--shard-size", "8"]


def test_two_ranks_make_the_entry_one_process_makes(photos, tiny_spec, tmp_path):
    reference = extract(tiny_spec(photos, root=str(tmp_path / "one")))
    assert len(reference.skipped) == 1
    run = torchrun(tmp_path, photos, tmp_path / "two", 2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("extracted 16 images") == 1, run.stdout  # rank 0 alone reports, for all ranks
    entry = only_entry(tmp_path / "two")
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["complete"] and not [f for f in entry.rglob("*") if ".tmp-" in f.name]
    assert_same_entry(entry, reference.path)
    again = extract(tiny_spec(photos, root=str(tmp_path / "two")))  # a single process reuses it all
    assert again.cache_hit and again.key == reference.key


def test_killed_rank_then_rerun_with_one_process_loses_and_duplicates_nothing(photos, tiny_spec, tmp_path):
    reference = extract(tiny_spec(photos, root=str(tmp_path / "one")))
    # Rank 1 owns train-00001 and val-00000; it dies right after renaming the first into place.
    run = torchrun(tmp_path, photos, tmp_path / "two", 2, FEATURECACHE_FAULT="after_rename:1",
                   FEATURECACHE_FAULT_RANK="1")
    assert run.returncode != 0
    entry = only_entry(tmp_path / "two")
    assert (entry / "shards" / "train-00001.h5").is_file()
    manifest_path = entry / "manifest.json"
    assert not manifest_path.exists() or not json.loads(manifest_path.read_text())["complete"]
    on_disk = sum(open_cache_rows(f) for f in (entry / "shards").glob("*.h5"))
    rerun = extract(replace_spec(tiny_spec(photos), root=str(tmp_path / "two")))
    assert not rerun.cache_hit
    assert rerun.computed == 16 - on_disk  # every complete shard of every rank was adopted
    assert not [f for f in entry.rglob("*") if ".tmp-" in f.name]
    # The adopted shard and the recomputed ones are listed in source order: the same rows,
    # in the same order, bitwise, as an uninterrupted single-process run.
    assert_same_entry(entry, reference.path)


def open_cache_rows(file: Path) -> int:
    import h5py

    with h5py.File(file, "r") as handle:
        return int(handle.attrs["rows"])
