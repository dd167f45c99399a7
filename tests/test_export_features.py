"""export-features writes features, labels, paths and splits that round-trip bit for bit."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from typer.testing import CliRunner

import featurecache
from featurecache import open_cache
from featurecache.cli import app
from helpers import flip_feature_byte, stderr_lines
from processes import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = dict(model="resnet18", weights="random", image_size=32, precision="fp32", dtype="float16",
                batch_size=8, workers=0, shard_size=4, taps=("pool", "layer4"))


@pytest.fixture
def cache(tmp_path):
    rng = np.random.default_rng(0)
    source = {"train": (rng.integers(0, 256, (10, 20, 20, 3), dtype=np.uint8), np.arange(10) % 2),
              "test": rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8), "classes": ["even", "odd"]}
    return open_cache(featurecache.extract(source=source, root=str(tmp_path / "c"), **SETTINGS).path)


def test_npy_round_trips_bit_for_bit(cache, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export-features", str(cache.path), "-o", str(out), "--tap", "layer4"])
    assert result.exit_code == 0, result.output
    for split in ("train", "test"):
        arrays = cache.arrays(split, "layer4")
        for name, values in arrays.items():
            loaded = np.load(out / split / f"{name}.npy", allow_pickle=False)
            assert loaded.dtype == values.dtype and loaded.tobytes() == values.tobytes()
    described = json.loads((out / "dataset.json").read_text())
    assert described["classes"] == ["even", "odd"] and described["unlabeled_splits"] == ["test"]
    assert described["shape"] == [512, 1, 1] and described["dtype"] == "float16"
    again = CliRunner().invoke(app, ["export-features", str(cache.path), "-o", str(out)])
    assert again.exit_code == 2 and "not an empty folder" in again.output


def test_parquet_round_trips_bit_for_bit(cache, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = featurecache.export_features(cache, tmp_path / "pq", format="parquet", splits=["train"])
    table = pq.read_table(out / "train.parquet")
    features = np.asarray(table.column("features").combine_chunks().flatten()).reshape(10, -1)
    assert features.tobytes() == cache.features("train").reshape(10, -1).tobytes()
    assert table.column("label").to_pylist() == list(cache.labels("train"))
    assert table.column("path").to_pylist() == cache.paths("train")
    assert not (out / "test.parquet").exists()


def test_bad_format_and_split_are_one_line(cache, tmp_path):
    for arguments, fragment in ((["--format", "csv"], "unknown --format"), (["--split", "val"], "split 'val'")):
        result = CliRunner().invoke(app, ["export-features", str(cache.path), "-o", str(tmp_path / "x"), *arguments])
        assert result.exit_code == 2 and fragment in result.output


@pytest.mark.parametrize("tap", ["pool", "layer4"])
def test_hf_round_trips_bit_for_bit(cache, tmp_path, tap):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "hf"
    result = CliRunner().invoke(app, ["export-features", str(cache.path), "-o", str(out), "--format", "hf",
                                      "--tap", tap])
    assert result.exit_code == 0, result.output
    loaded = datasets.load_from_disk(str(out))
    assert isinstance(loaded, datasets.DatasetDict) and list(loaded) == ["train", "test"]
    for split, dataset in loaded.items():
        arrays = cache.arrays(split, tap)
        assert dataset.features["label"].names == ["even", "odd"]
        assert dataset["label"][:] == arrays["labels"].tolist() and dataset["path"][:] == arrays["paths"].tolist()
        assert dataset["index"][:] == arrays["index"].tolist()
        stored = dataset.with_format("arrow")["features"].combine_chunks()
        stored = getattr(stored, "storage", stored)  # an Array3D's extension array holds nested lists
        while hasattr(stored, "flatten"):
            stored = stored.flatten()
        assert stored.type == "halffloat"  # the cache's float16, not widened
        assert stored.to_numpy().tobytes() == arrays["features"].tobytes()
        values = np.asarray(dataset.with_format("numpy")["features"][:])
        assert values.shape == arrays["features"].shape and (values == arrays["features"]).all()
    assert list(loaded["test"]["label"][:]) == [-1, -1, -1]  # the unlabelled split
    assert json.loads((out / "dataset.json").read_text())["format"] == "hf"


def _entry_files(cache) -> dict:
    return {p: p.read_bytes() for p in sorted(cache.path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("format", ["npy", "parquet"])
def test_a_repeated_split_is_refused_before_anything_is_written(cache, tmp_path, format):
    """npy failed half-way (exit 1, a folder left behind); parquet wrote the split twice."""
    if format == "parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export-features", str(cache.path), "-o", str(out), "--format", format,
                                      "--split", "test", "--split", "test"])
    assert result.exit_code == 2, result.output
    assert stderr_lines(result) == ["error: --split test is given twice; name each split once"]
    assert not out.exists()


def test_output_paths_it_would_break_are_refused(cache, tmp_path, monkeypatch):
    """-o under a file (it failed with exit 1), '-' (no standard output for a folder) and a folder
    inside a cache entry: one line, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (cache.path / "empty").mkdir()
    (tmp_path / "linked").symlink_to(cache.path / "empty")  # an empty folder, but in the entry
    before = _entry_files(cache)
    for output, expected in (("notes.txt/sub", "error: -o notes.txt/sub: notes.txt is a file, not a folder; "
                                               "choose another path"),
                             ("-", "error: -o - would write a file named '-': this command does not write to "
                                   "standard output; give a name such as features/"),
                             (str(cache.path / "heads"), f"error: {cache.path / 'heads'} lies inside the cache entry "
                                                         f"{cache.path}, whose files featurecache manages; choose a "
                                                         "path outside it"),
                             ("linked", f"error: linked lies inside the cache entry {cache.path}, whose files "
                                        "featurecache manages; choose a path outside it")):
        result = CliRunner().invoke(app, ["export-features", str(cache.path), "-o", output])
        assert result.exit_code == 2, result.output
        assert stderr_lines(result) == [expected]
    assert not (tmp_path / "-").exists() and (tmp_path / "notes.txt").read_text() == "mine"
    assert _entry_files(cache) == before and list((cache.path / "empty").iterdir()) == []


def test_a_failed_export_leaves_nothing_behind(cache, tmp_path):
    """A damaged shard of the second split fails the export after the first was written: the
    folder it made is removed, and a given empty folder is left empty."""
    flip_feature_byte(cache.path / "shards" / "test-00000.h5", "pool", 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new", empty):
        result = CliRunner().invoke(app, ["export-features", str(cache.path), "-o", str(out)])
        assert result.exit_code == 1 and "fails its checksum" in result.stderr, result.output
        assert not (tmp_path / "new").exists() and list(empty.iterdir()) == []
        # nor a temporary folder beside it: a failed run (not a killed one) cleans up after itself
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _files(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fault, given_empty", [("export_split:1", False), ("export_split:2", True),
                                                ("export_rename:1", False)])
def test_a_killed_export_leaves_no_output_and_the_next_one_completes(cache, tmp_path, fault, given_empty):
    """SIGKILLed after the first split, after the second, and with every file written and fsynced
    just before the rename: the old export left a half-written folder, which the next export
    refused ('not an empty folder'). Now -o is absent (or still the empty folder it was given),
    the killed run's hidden temporary folder is all that is left, and the rerun removes it and
    writes the same bytes as an uninterrupted export."""
    out = tmp_path / "new" / "features"
    if given_empty:
        out.mkdir(parents=True)
    arguments = ["export-features", str(cache.path), "-o", str(out)]
    assert run_cli(arguments, tmp_path / "killed.log", fault=fault) == -signal.SIGKILL
    assert list(out.iterdir()) == [] if given_empty else not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p != out]
    assert len(leftovers) == 1 and leftovers[0].startswith(".features.tmp-"), leftovers
    assert run_cli(arguments, tmp_path / "rerun.log") == 0, (tmp_path / "rerun.log").read_text()
    assert [p.name for p in out.parent.iterdir()] == ["features"]  # the leftover is gone
    reference = featurecache.export_features(cache, tmp_path / "reference")
    assert _files(out) == _files(reference) and "train/features.npy" in _files(out)


def test_the_temporary_folder_of_a_running_export_is_left_alone(cache, tmp_path):
    """Only a dead writer's temporary folder is removed: one whose pid is alive (here this
    process's own, as for an export running beside it) may still be filled and renamed."""
    import os

    live = tmp_path / f".features.tmp-{os.getpid()}-0123abcd"
    (live / "train").mkdir(parents=True)
    featurecache.export_features(cache, tmp_path / "features")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "c") == [live.name, "features"]
    assert (live / "train").is_dir()


def test_a_mount_point_is_refused_before_any_work(cache, tmp_path, monkeypatch):
    """-o an empty mount point (docker -v host:/out): the export was written beside it, then its rename
    onto the mount point failed after all the work."""
    import os

    mount = tmp_path / "out"
    mount.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: str(path) == str(mount) or real(path))
    result = CliRunner().invoke(app, ["export-features", str(cache.path), "-o", str(mount)])
    assert result.exit_code == 2 and stderr_lines(result) == [
        f"error: {mount} is a mount point, which the finished export cannot replace; give a new folder inside it "
        f"(e.g. -o {mount / 'features'})"], result.output
    assert list(mount.iterdir()) == [] and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    inside = CliRunner().invoke(app, ["export-features", str(cache.path), "-o", str(mount / "features")])
    assert inside.exit_code == 0, inside.output
