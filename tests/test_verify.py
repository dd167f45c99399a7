"""Damaged caches: `verify` reports every problem, `--repair` recomputes only bad shards,
and a normal open refuses damage and says to run verify."""

from __future__ import annotations

import importlib
import json
import shutil

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from featurecache import extract, open_cache
from featurecache.cli import app
from featurecache.errors import CorruptCacheError
from featurecache.extract.stage import ExtractSpec
from featurecache.cache.integrity import seal_json
from featurecache.cache.shards import file_sha256
from featurecache.cache.store import read_manifest
from featurecache.maintain.verify import repair_entry, verify_entry

from helpers import flip_feature_byte, replace_spec, write_image
from processes import tiny_backbone

runner = CliRunner()
extract_module = importlib.import_module("featurecache.extract.stage")
TARGET = "shards/train-00001.h5"  # rows 4..7 of train


def _manifest(entry):
    return json.loads((entry / "manifest.json").read_text())


def _save_manifest(entry, manifest):
    """As featurecache would have written it (sealed): the damage is in what it says."""
    (entry / "manifest.json").write_text(json.dumps(seal_json(manifest)))


def zero_length(entry):
    (entry / TARGET).write_bytes(b"")


def truncated(entry):
    data = (entry / TARGET).read_bytes()
    (entry / TARGET).write_bytes(data[: len(data) // 2])


def flipped_bytes(entry):
    flip_feature_byte(entry / TARGET, "pool", at=100, mask=0xFF)


def not_in_manifest(entry):
    manifest = _manifest(entry)
    manifest["shards"] = [s for s in manifest["shards"] if s["file"] != TARGET]
    _save_manifest(entry, manifest)


def listed_but_missing(entry):
    (entry / TARGET).unlink()


DAMAGE = {  # how each is reported, and the word a normal open's error contains
    zero_length: "zero-length",
    truncated: "truncated",
    flipped_bytes: "checksum mismatch",
    not_in_manifest: "not in the manifest",
    listed_but_missing: "missing",
}


@pytest.fixture(scope="module", autouse=True)
def tiny():
    with tiny_backbone():
        yield


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_spec_module):
    """One healthy entry (16 images, shards of 4: train 4+4+2, val 4+2), copied per test."""
    base = tmp_path_factory.mktemp("verify")
    for i in range(16):
        split, label = ("train", "val")[i // 10], ("ants", "bees")[i % 2]
        write_image(base / "photos" / split / label / f"{label}_{i}.png", i + 1)
    spec = tiny_spec_module(base / "photos", root=str(base / "pristine"))
    cache = open_cache(extract(spec).path)
    return spec, cache.path, {split: _by_path(cache, split) for split in ("train", "val")}


@pytest.fixture(scope="module")
def tiny_spec_module():
    def make(source, **overrides):
        base = dict(source=str(source), model="tiny", weights="random", image_size=32,
                    precision="fp32", dtype="float32", batch_size=4, workers=0, shard_size=4)
        return ExtractSpec(**{**base, **overrides})

    return make


@pytest.fixture
def damaged(pristine, tmp_path):
    def make(damage):
        spec, entry, _ = pristine
        shutil.copytree(entry.parent, tmp_path / "cache")
        copy = tmp_path / "cache" / entry.name
        damage(copy)
        return replace_spec(spec, root=str(tmp_path / "cache")), copy

    return make


def _computed_by(monkeypatch) -> list[int]:
    counts: list[int] = []
    original = extract_module.run_backbone

    def counting(model, source, samples, **kwargs):
        counts.append(len(samples))
        return original(model, source, samples, **kwargs)

    monkeypatch.setattr(extract_module, "run_backbone", counting)
    return counts


def _by_path(cache, split):
    paths = cache.paths(split)
    order = np.argsort(paths)
    return [paths[i] for i in order], cache.features(split)[order]


def test_healthy_entry_verifies(damaged):
    _, entry = damaged(lambda entry: None)
    report = verify_entry(entry)
    assert report.ok and report.shards_checked == 5 and report.rows_checked == 16
    result = runner.invoke(app, ["verify", str(entry)])
    assert result.exit_code == 0 and "ok" in result.stdout


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__ for d in DAMAGE])
def test_damage_is_reported_refused_on_open_and_repaired(damage, damaged, pristine, monkeypatch):
    spec, entry = damaged(damage)
    report = verify_entry(entry)
    assert [str(p) for p in report.problems if p.file == TARGET and DAMAGE[damage] in p.what], report.problems

    with pytest.raises(CorruptCacheError, match="run featurecache verify"):  # a normal open, then a read
        cache = open_cache(entry)
        cache.features("train"), cache.labels("train")

    listing = runner.invoke(app, ["verify", str(entry)])
    assert listing.exit_code == 1 and f"problem {TARGET}" in listing.stdout
    # info and ls stat the shards (no read): a missing or resized one is damage, not "complete"
    info = " ".join(runner.invoke(app, ["info", str(entry)]).stdout.split())  # unwrapped
    table = runner.invoke(app, ["ls", str(entry.parent)]).stdout
    if damage in (zero_length, truncated, listed_but_missing):
        what = "is missing" if damage is listed_but_missing else "has the wrong size"
        assert f"state: damaged: shard {TARGET} {what} (run featurecache verify --repair)" in info
        assert "damaged" in table and "complete" not in table
    else:  # flipped bytes and an unlisted shard take a checksum or a listing: verify's job
        assert "state: complete" in info and "complete" in table

    computed = _computed_by(monkeypatch)
    repaired = runner.invoke(app, ["verify", str(entry), "--repair"])
    assert repaired.exit_code == 0, repaired.output
    assert sum(computed) == (0 if damage is not_in_manifest else 4)  # a listed-free good shard is adopted
    assert verify_entry(entry).ok and not list(entry.rglob("*.tmp-*"))
    cache = open_cache(entry)
    for split, (clean_paths, clean_features) in pristine[2].items():
        paths, features = _by_path(cache, split)
        assert paths == clean_paths
        np.testing.assert_array_equal(features, clean_features)  # bitwise: same batches, same shapes


@pytest.mark.parametrize("shards", ["file", "dangling-link"])
def test_repair_refuses_a_shards_folder_that_is_not_one_and_writes_nothing(damaged, shards, tmp_path):
    """It dropped the shards from the manifest, then failed on 'Not a directory': the entry was
    left incomplete and extract then failed on 'File exists'."""
    _, entry = damaged(lambda entry: None)
    shutil.rmtree(entry / "shards")
    if shards == "file":
        (entry / "shards").write_bytes(b"")
    else:
        (entry / "shards").symlink_to(tmp_path / "nowhere")
    before = (entry / "manifest.json").read_bytes()
    result = runner.invoke(app, ["verify", str(entry), "--repair"])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.output, result.stderr
    assert f"{entry / 'shards'} is not a folder" in result.stderr and "move it away" in result.stderr
    assert (entry / "manifest.json").read_bytes() == before
    assert "state: complete" not in " ".join(runner.invoke(app, ["info", str(entry)]).stdout.split())


def test_every_problem_is_reported_at_once(damaged):
    _, entry = damaged(flipped_bytes)
    (entry / "shards" / "val-00001.h5").unlink()
    (entry / "shards" / ".train-00002.h5.tmp-1-deadbeef").write_bytes(b"partial")
    shutil.copy(entry / "shards" / "val-00000.h5", entry / "shards" / "val-00009.h5")
    files = {p.file for p in verify_entry(entry).problems}
    assert {TARGET, "shards/val-00001.h5", "shards/.train-00002.h5.tmp-1-deadbeef", "shards/val-00009.h5"} <= files
    repair_entry(entry)
    assert verify_entry(entry).ok


@pytest.mark.parametrize("name, make, fragment", [
    ("features/pool", lambda h: h.create_dataset("features/pool", data=np.zeros((4, 100), np.float32)), "shape"),
    ("labels", lambda h: h.create_dataset("labels", data=np.zeros(4, np.float64)), "dtype"),
])
def test_unexpected_shapes_and_dtypes_are_rejected(name, make, fragment, damaged):
    _, entry = damaged(lambda entry: None)
    features = open_cache(entry).features("train")
    with h5py.File(entry / TARGET, "a") as handle:
        del handle[name]
        make(handle)
    manifest = _manifest(entry)  # even with a matching size and checksum
    record = next(s for s in manifest["shards"] if s["file"] == TARGET)
    record.update(bytes=(entry / TARGET).stat().st_size, sha256=file_sha256(entry / TARGET))
    _save_manifest(entry, manifest)
    if name == "features/pool":
        # A features read copies the bytes at the manifest's offset and checks them against
        # the manifest's checksum: the replaced dataset's file still holds the recorded
        # features, intact, and those are what is read. verify reports the damage.
        np.testing.assert_array_equal(open_cache(entry).features("train"), features)
    else:
        with pytest.raises(CorruptCacheError, match=f"{fragment}.*run featurecache verify"):
            open_cache(entry).labels("train")
    assert any(fragment in p.what for p in verify_entry(entry).problems)


@pytest.mark.parametrize("bad_path", ["../../outside.h5", "/etc/passwd", "shards/../../x.h5"])
def test_manifest_paths_outside_the_entry_are_refused(bad_path, damaged):
    _, entry = damaged(lambda entry: None)
    manifest = _manifest(entry)
    manifest["shards"][0]["file"] = bad_path
    _save_manifest(entry, manifest)
    with pytest.raises(CorruptCacheError, match="outside the entry"):
        read_manifest(entry)
    report = verify_entry(entry)
    assert not report.manifest_readable and "outside the entry" in str(report.problems[0])
    with pytest.raises(CorruptCacheError, match="unreadable"):
        repair_entry(entry)


@pytest.mark.parametrize("text", ['{"broken', "", "\x00\xff"])
def test_an_unreadable_manifest_tells_verify_users_to_extract_again(text, damaged):
    """verify on a manifest that is not JSON advised running verify, then --repair, which
    cannot rebuild it (nothing records what to recompute): it says what will help."""
    _, entry = damaged(lambda entry: None)
    (entry / "manifest.json").write_text(text, encoding="latin-1")
    result = runner.invoke(app, ["verify", str(entry)])
    assert result.exit_code == 1
    assert f"problem manifest.json: manifest {entry / 'manifest.json'} is unreadable" in result.stdout
    assert f"the manifest cannot be read; delete {entry} and run featurecache extract again" in result.stdout
    assert "run featurecache verify" not in result.stdout
    repaired = runner.invoke(app, ["verify", str(entry), "--repair"])
    assert repaired.exit_code == 1 and "run featurecache verify" not in repaired.output
    assert f"delete {entry} and run featurecache extract again" in repaired.output


def test_an_unfinished_finetune_run_is_a_warning_with_the_command_that_finishes_it(damaged):
    """verify said "ok" (exit 0) of an entry whose finetune run had stopped after 1 of 2 epochs,
    a run export refuses. It now warns as predict does (the run, its epochs, the command that
    finishes it) and exits 1, as for an extraction that has not finished; it is not damage, so
    --repair leaves it alone, and once the run is finished the entry is ok."""
    import shlex

    from featurecache.finetune.stage import FinetuneSpec, finetune
    from featurecache.fit.stage import FitSpec, fit_head
    from helpers import stderr_lines

    _, entry = damaged(lambda entry: None)
    fit_head(open_cache(entry), FitSpec(head="logistic"))

    def stop(event):
        if event["phase"] == "train" and event["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(entry, FinetuneSpec(head="logistic", epochs=2, batch_size=4, workers=0, augment=False, name="half"),
                 progress=stop)
    (entry / "finetune" / "early").mkdir()  # a run stopped before its first record
    run = entry / "finetune" / "half"
    files = {p: p.read_bytes() for p in run.iterdir()}
    for args in (["verify", str(entry)], ["verify", str(entry), "--repair"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        early, half = stderr_lines(result)
        assert early == ("warning: finetune run 'early' has no record yet: it was stopped before its first evaluation "
                         "ended, or is still running; rerun the finetune command (with --name early) to finish it")
        assert half.startswith("warning: finetune run 'half' is unfinished (1 of 2 epochs); rerun the finetune "
                               f"command to finish it: featurecache finetune {entry} --name half --head logistic ")
        assert result.stdout.splitlines()[-1].endswith(
            "other artifacts checked; no damage, but 2 finetune run(s) unfinished (rerun the finetune command)")
        assert "problem" not in result.stdout and "repaired" not in result.stdout
        assert {p: p.read_bytes() for p in run.iterdir()} == files  # --repair left the run as it was

    finished = runner.invoke(app, shlex.split(half.split("to finish it: ", 1)[1])[1:] + ["--quiet"])
    assert finished.exit_code == 0 and "resumed after epoch 1" in finished.stdout, finished.output
    (entry / "finetune" / "early").rmdir()
    result = runner.invoke(app, ["verify", str(entry)])
    assert (result.exit_code, result.stderr) == (0, "") and result.stdout.rstrip().endswith("checked; ok")


def test_a_running_writers_temporary_files_are_left_alone(damaged):
    """fit-head, finetune and report write without the entry lock (and other entries' extract into
    _weights/): verify --repair deleted their temporary files under their feet, and their renames
    failed. A dead writer's are still reported and removed."""
    import subprocess
    import sys

    _, entry = damaged(lambda entry: None)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [entry / "heads" / "knn" / f".head.safetensors.tmp-{writer.pid}-0123abcd",
                 entry / "report" / f".report.html.tmp-{writer.pid}-0123abcd",
                 entry.parent / "_weights" / f".x.safetensors.tmp-{writer.pid}-0123abcd"]
        for name in names:
            name.parent.mkdir(parents=True, exist_ok=True)
            name.write_bytes(b"being written")
        repaired = runner.invoke(app, ["verify", str(entry), "--repair"])
        assert repaired.exit_code == 0, repaired.output
        assert all(name.read_bytes() == b"being written" for name in names)
        assert verify_entry(entry).ok
    finally:
        writer.kill()
        writer.wait()
    report = verify_entry(entry)  # the writer died: what it left is a leftover
    assert sorted(p.file for p in report.problems) == [
        "../_weights/" + names[2].name, f"heads/knn/{names[0].name}", f"report/{names[1].name}"]
    repaired = runner.invoke(app, ["verify", str(entry), "--repair"])
    assert repaired.exit_code == 0, repaired.output
    assert not any(name.exists() for name in names) and verify_entry(entry).ok
