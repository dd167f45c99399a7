"""Crash safety, proven by killing the real `featurecache extract` process.

A run is SIGKILLed at named points of the write path (see featurecache/faults.py), at
every occurrence of each point, under three weight seeds. After each kill the entry
on disk is checked (the manifest parses; every shard it lists is complete with its
recorded SHA-256; no final shard file is half-written), then a rerun must complete,
recompute exactly the rows that no complete shard holds, leave no temporary file, and
give bitwise the features, labels, indices and paths of an uninterrupted run.
Also: an external SIGKILL and Ctrl-C of a fresh `python -m featurecache` process, a
killed DataLoader worker, disk full, and two runs on one entry.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from featurecache import extract, open_cache
from featurecache.errors import CacheLockedError, ExtractionError
from featurecache.cache.shards import ShardWriter, file_sha256
from featurecache.cache.store import entry_lock

from helpers import replace_spec, write_image
from processes import computed_count, run_cli, start_cli, tiny_backbone

IMAGES = 24  # train 2 x 8, val 2 x 4: shards of 6 give train 6+6+4, val 6+2
# How often one uninterrupted run reaches each fault point (batches of 4 never straddle
# a shard, so shards of 6 take two appends: rows 0-3, then 4-5).
REACHED = {"after_lock": 1, "shard_open": 5, "after_append": 8, "before_rename": 5,
           "after_rename": 5, "before_manifest_rename": 7, "after_manifest": 5}
SEEDS = (0, 1, 2)
KILLS = [(point, n, SEEDS[i % len(SEEDS)]) for i, (point, n) in
         enumerate((p, n) for p, count in REACHED.items() for n in range(1, count + 1))]
DOUBLE_KILLS = [("after_append:3", "after_rename:1", 0), ("before_rename:2", "before_manifest_rename:3", 1),
                ("after_manifest:1", "shard_open:2", 2), ("after_rename:4", "after_append:1", 0)]


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill") / "photos"
    seed = 0
    for split, count in (("train", 8), ("val", 4)):
        for label in ("ants", "bees"):
            for i in range(count):
                seed += 1
                write_image(root / split / label / f"{label}_{i}.png", seed, size=32)
    return root


def cli_args(data: Path, root: Path, seed: int, *extra: str, model: str = "tiny") -> list[str]:
    return ["extract", str(data), "--model", model, "--weights", "random", "--seed", str(seed),
            "--image-size", "32", "--precision", "fp32", "--dtype", "float32", "--workers", "0",
            "--shard-size", "6", "--batch-size", "4", "--root", str(root), *extra]


def entry_of(root: Path) -> Path:
    entries = [p for p in root.iterdir() if p.is_dir() and p.name != "_weights"]
    assert len(entries) == 1, entries
    return entries[0]


def snapshot(entry: Path) -> dict:
    cache = open_cache(entry)
    return {split: (cache.features(split), cache.labels(split), cache.index(split), cache.paths(split))
            for split in ("train", "val")}


def assert_same(entry: Path, reference: dict) -> None:
    for split, (features, labels, index, paths) in snapshot(entry).items():
        expected = reference[split]
        assert paths == expected[3], split
        np.testing.assert_array_equal(labels, expected[1])
        np.testing.assert_array_equal(index, expected[2])
        assert features.tobytes() == expected[0].tobytes(), f"{split} features differ bitwise"


def temp_files(entry: Path) -> list[Path]:
    return [f for f in entry.rglob("*") if ".tmp-" in f.name]


def check_after_kill(entry: Path) -> int:
    """The on-disk promises after a kill; returns the rows complete shard files hold."""
    manifest_path = entry / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"shards": []}
    for record in manifest["shards"]:  # the manifest lists only complete shards
        file = entry / record["file"]
        assert file.stat().st_size == record["bytes"] and file_sha256(file) == record["sha256"], record
    rows = 0
    for file in (entry / "shards").glob("*.h5"):
        if ".tmp-" in file.name:
            continue
        with h5py.File(file, "r") as handle:  # a final name always holds a finished file
            rows += int(handle.attrs["rows"])
            assert handle["features/pool"][:].shape[0] == handle.attrs["rows"]
    return rows


@pytest.fixture(scope="module")
def references(kill_data, tmp_path_factory) -> dict:
    """An uninterrupted run per seed; seed 0's manifest is read in a loop while it runs."""
    out, reads = {}, 0
    for seed in SEEDS:
        root = tmp_path_factory.mktemp(f"reference-{seed}")
        process = start_cli(cli_args(kill_data, root, seed), root / "log")
        while process.is_alive():
            for manifest in root.glob("*/manifest.json"):
                try:
                    json.loads(manifest.read_text())  # parses at every moment
                    reads += 1
                except FileNotFoundError:
                    pass
        process.join()
        assert process.exitcode == 0, (root / "log").read_text()
        out[seed] = snapshot(entry_of(root))
    out["manifest_reads"] = reads
    return out


def test_manifest_parses_at_every_moment_of_a_run(references):
    assert references["manifest_reads"] > 0


@pytest.mark.parametrize("point, n, seed", KILLS, ids=[f"{p}:{n}-seed{s}" for p, n, s in KILLS])
def test_sigkill_then_rerun_reproduces_uninterrupted_run(point, n, seed, kill_data, references, tmp_path):
    root = tmp_path / "cache"
    killed = run_cli(cli_args(kill_data, root, seed), tmp_path / "killed.log", fault=f"{point}:{n}")
    assert killed == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    entry = entry_of(root)
    survived = check_after_kill(entry)
    assert run_cli(cli_args(kill_data, root, seed), tmp_path / "rerun.log") == 0, (tmp_path / "rerun.log").read_text()
    assert computed_count(tmp_path / "rerun.log") == IMAGES - survived  # only the lost rows
    assert temp_files(entry) == []
    assert_same(entry, references[seed])


@pytest.mark.parametrize("first, second, seed", DOUBLE_KILLS)
def test_killed_again_while_resuming(first, second, seed, kill_data, references, tmp_path):
    root = tmp_path / "cache"
    for fault in (first, second):
        assert run_cli(cli_args(kill_data, root, seed), tmp_path / "killed.log", fault=fault) == -signal.SIGKILL
        survived = check_after_kill(entry_of(root))
    assert run_cli(cli_args(kill_data, root, seed), tmp_path / "rerun.log") == 0
    assert computed_count(tmp_path / "rerun.log") == IMAGES - survived
    assert temp_files(entry_of(root)) == []
    assert_same(entry_of(root), references[0 if seed == 0 else seed])


def _real_process(args: list[str]) -> subprocess.Popen:
    # A pause after each manifest update, so that the signal sent once a shard is listed
    # lands mid-run even on a loaded machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEATURECACHE_OFFLINE": "1", "FEATURECACHE_FAULT_PAUSE": "after_manifest:1"}
    # SIGINT as in a terminal: a shell starts background jobs (`pytest &`) with SIGINT ignored,
    # and Python then keeps ignoring it, so Ctrl-C would never reach the run.
    return subprocess.Popen([sys.executable, "-m", "featurecache", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _when_one_shard_is_listed(process: subprocess.Popen, root: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        for manifest in root.glob("*/manifest.json"):
            shards = json.loads(manifest.read_text())["shards"]
            if shards:
                return
        time.sleep(0.01)
    pytest.fail(f"the run ended (code {process.poll()}) before a shard was listed")


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_fresh_process_killed_or_interrupted_mid_run(signal_number, kill_data, tmp_path):
    # A fresh `python -m featurecache` knows only the built-in backbones: resnet18 here.
    root = tmp_path / "cache"
    args = cli_args(kill_data, root, 0, "--batch-size", "2", model="resnet18")
    process = _real_process(args)
    _when_one_shard_is_listed(process, root)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    entry = entry_of(root)
    if signal_number == signal.SIGINT:
        assert process.returncode == 130 and "error: interrupted" in stderr, stderr
        assert "Traceback" not in stderr and temp_files(entry) == []  # cleaned up on the way out
    else:
        assert process.returncode == -signal.SIGKILL
    survived = check_after_kill(entry)
    assert survived < IMAGES
    assert run_cli(args, tmp_path / "rerun.log") == 0
    assert computed_count(tmp_path / "rerun.log") == IMAGES - survived
    clean = tmp_path / "clean"
    assert run_cli([*args, "--root", str(clean)], tmp_path / "clean.log") == 0
    assert_same(entry, snapshot(entry_of(clean)))
    assert temp_files(entry) == []


def test_killed_dataloader_worker_fails_cleanly(kill_data, references, tmp_path):
    root = tmp_path / "cache"
    args = cli_args(kill_data, root, 0)
    args[args.index("--workers") + 1] = "1"
    started = time.monotonic()
    code = run_cli(args, tmp_path / "worker.log", fault="worker_load:7", timeout=90)
    log = (tmp_path / "worker.log").read_text()
    assert code == 1 and "error: a data-loading worker died" in log, log
    assert "Traceback" not in log and time.monotonic() - started < 60
    entries = [p for p in root.iterdir() if p.is_dir() and p.name != "_weights"]
    # an entry is left only if a shard was stored before the worker died (a failed run that stored
    # no row leaves none; which it is depends on the writer thread's timing)
    assert all(check_after_kill(entry) > 0 for entry in entries), entries
    assert run_cli(cli_args(kill_data, root, 0), tmp_path / "rerun.log") == 0
    assert_same(entry_of(root), references[0])


@pytest.fixture
def tiny():
    with tiny_backbone():
        yield


def test_disk_full_keeps_earlier_shards_and_resumes(image_folder, tiny_spec, tiny, monkeypatch):
    spec = tiny_spec(image_folder, model="tiny")  # 16 images in shards of 4: train 4+4+2, val 4+2
    original = ShardWriter.append

    def full_disk(self, rows):
        if self.final_path.name == "train-00002.h5":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, rows)

    monkeypatch.setattr(ShardWriter, "append", full_disk)
    with pytest.raises(ExtractionError, match="disk full.*earlier shards are intact.*Free disk space"):
        extract(spec)
    entry = entry_of(Path(spec.root or os.environ["FEATURECACHE_ROOT"]))
    assert not (entry / "shards" / "train-00002.h5").exists() and temp_files(entry) == []
    manifest = json.loads((entry / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shards/train-00000.h5", "shards/train-00001.h5"]
    assert check_after_kill(entry) == 8
    monkeypatch.setattr(ShardWriter, "append", original)
    resumed = extract(spec)
    assert resumed.computed == 16 - 8
    clean = extract(replace_spec(spec, root=str(image_folder.parent / "clean")))
    assert_same(resumed.path, snapshot(clean.path))


def test_two_runs_on_one_entry_never_interleave(kill_data, references, tmp_path):
    root = tmp_path / "cache"
    runs = [start_cli(cli_args(kill_data, root, 0), tmp_path / f"run{i}.log") for i in range(2)]
    for process in runs:
        process.join(120)
    assert [p.exitcode for p in runs] == [0, 0]
    assert sorted(computed_count(tmp_path / f"run{i}.log") for i in range(2)) == [0, IMAGES]
    assert_same(entry_of(root), references[0])


def test_a_held_lock_times_out_with_a_clear_message(image_folder, tiny_spec, tiny):
    spec = tiny_spec(image_folder, model="tiny", lock_timeout=0.3)
    entry = extract(spec).path
    with entry_lock(entry, 1.0):  # another open file description: flock conflicts
        with pytest.raises(CacheLockedError, match="another featurecache process is writing"):
            extract(replace_spec(spec, seed=0))
    assert CacheLockedError.exit_code == 1


def test_lock_of_a_killed_process_does_not_block(kill_data, references, tmp_path):
    root = tmp_path / "cache"
    assert run_cli(cli_args(kill_data, root, 0), tmp_path / "killed.log", fault="after_lock:1") == -signal.SIGKILL
    entry = entry_of(root)
    assert (entry / ".lock").exists()  # the file stays; its flock died with the process
    started = time.monotonic()
    with entry_lock(entry, 0.5):
        assert time.monotonic() - started < 0.5


def test_soft_lock_where_flock_is_unsupported(image_folder, tiny_spec, tiny, monkeypatch):
    import fcntl

    def no_flock(*args, **kwargs):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    spec = tiny_spec(image_folder, model="tiny", lock_timeout=0.3)
    result = extract(spec)
    assert result.splits == {"train": 10, "val": 6} and not (result.path / ".lock.soft").exists()
    with entry_lock(result.path, 1.0):
        assert (result.path / ".lock.soft").exists()
        with pytest.raises(CacheLockedError):
            extract(spec)
