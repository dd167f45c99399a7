"""Hostile caches: every artifact a command reads is checked first, every mistake is one
`error:` line, every figure is honest. Each test is an attack on an entry built from
nothing at test time (the tiny backbone, a few generated images); RELIABILITY.md counts
them. Through the real CLI (CliRunner), and in a child process where a crash of the
interpreter is the thing to rule out."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading

import h5py
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import featurecache.cache.integrity as integrity
import featurecache.data.sources as sources
from featurecache import extract, open_cache
from featurecache.cli import app
from featurecache.errors import CorruptCacheError, FeatureCacheError, HeadError, NameTakenError, SourceError, StaleError
from featurecache.extract.stage import ExtractSpec
from featurecache.fit.carve import stratified_split as _stratified_split
from featurecache.fit.stage import FitSpec, fit_head, leaderboard, make_ensemble
from featurecache.fit.headstore import load_head, read_record
from featurecache.cache.integrity import seal, seal_json
from featurecache.cache.shards import file_sha256
from featurecache.maintain.verify import verify_entry

from helpers import write_image, stderr_lines
from processes import run_cli, tiny_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()
FAST = ["--param", "C=1.0"]


@pytest.fixture(scope="module", autouse=True)
def tiny():
    with tiny_backbone():
        yield


def spec_for(source, root, **overrides) -> ExtractSpec:
    base = dict(source=str(source), model="tiny", weights="random", image_size=32, precision="fp32",
                dtype="float32", batch_size=4, workers=0, shard_size=4, root=str(root))
    return ExtractSpec(**{**base, **overrides})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A healthy entry (2 classes; train 12, val 6, test 6) with heads logistic, knn and ensemble vote."""
    base = tmp_path_factory.mktemp("hostile-cache")
    seed = 0
    for split, count in (("train", 6), ("val", 3), ("test", 3)):
        for label in ("ants", "bees"):
            for i in range(count):
                seed += 1
                write_image(base / "photos" / split / label / f"{label}_{i}.png", seed)
    entry = extract(spec_for(base / "photos", base / "cache")).path
    fit_head(entry, FitSpec(head="logistic", params={"C": 1.0}))
    fit_head(entry, FitSpec(head="knn", params={"k": 3}))
    make_ensemble(entry, ["logistic", "knn"], name="vote")
    return base, entry


@pytest.fixture
def entry(pristine, tmp_path):
    """A fresh copy of the pristine cache root; returns the entry's path."""
    base, original = pristine
    shutil.copytree(original.parent, tmp_path / "cache")
    return tmp_path / "cache" / original.name


@pytest.fixture
def image(pristine):
    return pristine[0] / "photos" / "test" / "ants" / "ants_0.png"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_error(result, code: int, *fragments: str) -> str:
    """One `error:` line on stderr, the exit code, no traceback; returns the line."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def edit_json(path, change, sealed=False) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(seal_json(data) if sealed else data))


def reseal(path, change_tensors=None, change_record=None, keep_checksum=False) -> None:
    """Rewrite a safetensors file with changed tensors or record, resealed (as a careful attacker would)."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    old = metadata.get("featurecache.checksum")
    if change_tensors:
        change_tensors(tensors)
    if change_record:
        record = json.loads(metadata["featurecache.head"])
        change_record(record)
        metadata["featurecache.head"] = json.dumps(record)
    metadata = {k: v for k, v in metadata.items() if not k.startswith("featurecache.") or k in (
        "featurecache.head", "featurecache.arch", "featurecache.preprocessing", "featurecache.finetune")}
    metadata = seal(metadata, tensors)
    if keep_checksum:
        metadata["featurecache.checksum"] = old
    save_file(tensors, str(path), metadata=metadata)


def flip_byte(path, from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def weights_file(entry):
    sha = json.loads((entry / "manifest.json").read_text())["weights"]["sha256"]
    return entry.parent / "_weights" / f"{sha}.safetensors"


# ------------------------------------------------------------------ 1. malformed manifests

def _set(*keys, value):
    def change(manifest):
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


def _duplicate_shard(manifest):
    manifest["shards"].append(dict(manifest["shards"][0]))


MANIFEST_ATTACKS = {  # id: (edit, what the error line names)
    "dtype-int8": (_set("dtype", value="int8"), "field dtype"),
    "dtype-complex64": (_set("dtype", value="complex64"), "field dtype"),
    "dtype-big-endian": (_set("dtype", value=">f4"), "field dtype"),
    "dtype-number": (_set("dtype", value=5), "field dtype"),
    "shards-not-a-list": (_set("shards", value={"file": "shards/train-00000.h5"}), "field shards"),
    "shard-missing-sha256": (lambda m: m["shards"][1].pop("sha256"), "field shards.1.sha256"),
    "shard-rows-string": (_set("shards", 1, "rows", value="4"), "field shards.1.rows"),
    "shard-rows-bool": (_set("shards", 1, "rows", value=True), "field shards.1.rows"),
    "shard-listed-twice": (_duplicate_shard, "listed twice"),
    "shard-path-outside": (_set("shards", 0, "file", value="../../outside.h5"), "outside the entry"),
    "shard-absolute-path": (_set("shards", 0, "file", value="/etc/passwd"), "outside the entry"),
    "weights-hash-path": (_set("weights", "sha256", value="../../../../etc/passwd"), "field weights.sha256"),
    "weights-file-elsewhere": (_set("weights", "file", value="/tmp/evil.safetensors"), "field weights"),
    "tap-shape-huge": (_set("taps", "pool", "shape", value=[10**9]), "field taps.pool.shape.0"),
    "tap-name-path": (lambda m: m["taps"].update({"../x": {"shape": [4]}}), "field taps"),
    "classes-duplicated": (lambda m: m["classes"].append(m["classes"][0]), "listed twice in classes"),
    "split-count-negative": (_set("splits", "train", value=-1), "field splits.train"),
    "split-name-path": (lambda m: m["splits"].update({"../../x": 0}), "field splits"),
    "feature-offset-past-end": (_set("shards", 0, "features", "pool", "offset", value=10**9), "run past"),
    "format-version": (_set("format_version", value=2), "field format_version"),
    "not-an-object": (lambda m: m.clear() or m.update({"__list__": True}), "field"),
    "crop-size-zero": (_set("config", "preprocessing", "crop_size", value=0), "crop_size"),
    "spec-batch-size-string": (_set("spec", "batch_size", value="x"), "field spec.batch_size"),
}

COMMANDS = {
    "info": lambda e, tmp, img: ["info", e],
    "verify": lambda e, tmp, img: ["verify", e],
    "verify-repair": lambda e, tmp, img: ["verify", e, "--repair"],
    "fit-head": lambda e, tmp, img: ["fit-head", e, "--name", "new", *FAST],
    "heads": lambda e, tmp, img: ["heads", e],
    "ensemble": lambda e, tmp, img: ["ensemble", e, "logistic", "knn", "--name", "vote2"],
    "predict": lambda e, tmp, img: ["predict", e, img, "--head", "logistic"],
    "export": lambda e, tmp, img: ["export", e, "--head", "logistic", "-o", tmp / "model.pt"],
    "report": lambda e, tmp, img: ["report", e, "-o", tmp / "report.html"],
    "finetune": lambda e, tmp, img: ["finetune", e, "--epochs", "1", "--from-cache"],
}


@pytest.mark.parametrize("attack", MANIFEST_ATTACKS)
def test_malformed_manifest_is_one_error_line_in_every_command(attack, entry, tmp_path, image):
    edit, fragment = MANIFEST_ATTACKS[attack]
    manifest_path = entry / "manifest.json"
    if attack == "not-an-object":
        manifest_path.write_text("[1, 2, 3]")
    else:
        edit_json(manifest_path, edit)
    for name, command in COMMANDS.items():
        line = assert_error(cli(*command(entry, tmp_path, image)), 2, str(manifest_path))
        assert fragment in line or attack == "not-an-object", (name, line)
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("attack", ["classes-renamed", "key-changed", "checksum-stripped"])
def test_manifest_edited_with_valid_values_is_detected_by_its_checksum(attack, entry, tmp_path, image):
    """Well-typed edits the schema cannot tell from real values: the manifest's own checksum does."""
    change = {"classes-renamed": lambda m: m.update(classes=["bees", "ants"]),
              "key-changed": lambda m: m.update(key="0" * 64),
              "checksum-stripped": lambda m: m.pop("checksum")}[attack]
    edit_json(entry / "manifest.json", change)
    fragment = "carries no checksum" if attack == "checksum-stripped" else "fails its checksum"
    for command in ("info", "fit-head", "heads", "predict", "report"):
        assert_error(cli(*COMMANDS[command](entry, tmp_path, image)), 1, "manifest.json", fragment)
    listing = cli("verify", entry)
    assert listing.exit_code == 1 and fragment in listing.stdout
    if attack == "classes-renamed":  # sealing it made every head name its predictions wrongly
        assert_error(cli("verify", entry, "--repair"), 1, "its classes differ from those head 'knn' was fitted with")
        assert not verify_entry(entry).ok
        return
    assert cli("verify", entry, "--repair").exit_code == 0  # every shard checked, then sealed as found
    assert verify_entry(entry).ok


@pytest.mark.parametrize("edit, fragment", [
    ("source-elsewhere", "the source its spec names"),
    ("source-gone", "cannot be opened to check"),
    ("name", "the name its spec names (renamed) is not this entry's"),
])
def test_repair_does_not_seal_a_spec_that_is_not_this_entrys(edit, fragment, entry, pristine, tmp_path):
    """An edited spec was sealed as found: finetune's image path and the report then reopened
    another dataset under this entry's labels, and a repair extracted into another entry."""
    other = tmp_path / "other-photos"
    shutil.copytree(pristine[0] / "photos", other)
    change = {"source-elsewhere": {"source": str(other)}, "source-gone": {"source": str(tmp_path / "gone")},
              "name": {"name": "renamed"}}[edit]
    edit_json(entry / "manifest.json", lambda m: m["spec"].update(change))
    before = (entry / "manifest.json").read_bytes()
    assert_error(cli("verify", entry, "--repair"), 1, fragment, "so --repair will not seal it")
    assert (entry / "manifest.json").read_bytes() == before and not verify_entry(entry).ok
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted([entry.name, "_weights"])


def test_repair_does_not_seal_a_manifest_whose_settings_no_longer_give_its_id(entry):
    """An edited config (here the crop size) was sealed, and a later repair re-extracted with
    it into another entry, leaving this one incomplete."""
    edit_json(entry / "manifest.json", lambda m: m["config"]["preprocessing"].update(crop_size=40))
    assert_error(cli("verify", entry, "--repair"), 1, "no longer give the entry's id")
    assert not verify_entry(entry).ok


@pytest.mark.parametrize("dtype", ["int8", "complex64", ">f4", "float64"])
def test_manifest_dtype_edit_never_crashes_the_interpreter(dtype, entry, tmp_path):
    """Seen as a segmentation fault of fit-head before the schema: run in a child process."""
    edit_json(entry / "manifest.json", _set("dtype", value=dtype))
    log = tmp_path / "fit.log"
    code = run_cli(["fit-head", str(entry), "--name", "x", "--param", "C=1.0"], log,
                   FEATURECACHE_ROOT=str(entry.parent))
    assert code == 2, (code, log.read_text())
    text = log.read_text()
    assert "error:" in text and "field dtype" in text and "Traceback" not in text


def test_deeply_nested_manifest_is_an_error_not_a_recursion_crash(entry):
    (entry / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_error(cli("info", entry), 1, "unreadable")
    result = cli("verify", entry)
    assert result.exit_code == 1 and "unreadable" in result.stdout


# ------------------------------------------------------------------ 2. hostile shards

def _resize_record(entry, file):
    def change(manifest):
        record = next(s for s in manifest["shards"] if s["file"] == file)
        record.update(bytes=(entry / file).stat().st_size, sha256=file_sha256(entry / file))
    edit_json(entry / "manifest.json", change, sealed=True)


def _external_link(handle, entry):
    outside = entry.parent / "outside.h5"
    with h5py.File(outside, "w") as other:
        other["labels"] = np.zeros(4, np.int64)
    del handle["labels"]
    handle["labels"] = h5py.ExternalLink(str(outside), "/labels")


def _virtual_dataset(handle, entry):
    outside = entry.parent / "outside.h5"
    with h5py.File(outside, "w") as other:
        other["labels"] = np.zeros(4, np.int64)
    layout = h5py.VirtualLayout(shape=(4,), dtype="i8")
    layout[:] = h5py.VirtualSource(str(outside), "labels", shape=(4,))
    del handle["labels"]
    handle.create_virtual_dataset("labels", layout)


def _external_storage(handle, entry):
    outside = entry.parent / "raw.bin"
    outside.write_bytes(np.zeros(4, np.int64).tobytes())
    del handle["labels"]
    handle.create_dataset("labels", shape=(4,), dtype="i8", external=[(str(outside), 0, 32)])


def _soft_link(handle, entry):
    del handle["labels"]
    handle["labels"] = h5py.SoftLink("/index")


def _labels_out_of_range(handle, entry):
    handle["labels"][0] = 7  # 2 classes


def _other_split(handle, entry):
    handle.attrs["split"] = "val"


SHARD_ATTACKS = {
    "external-link": (_external_link, "ExternalLink"),
    "virtual-dataset": (_virtual_dataset, "virtual dataset"),
    "external-storage": (_external_storage, "stored in another file"),
    "soft-link": (_soft_link, "SoftLink"),
    "labels-out-of-range": (_labels_out_of_range, "run from 0 to 7"),
    "split-mismatch": (_other_split, "holds split"),
}


@pytest.mark.parametrize("attack", SHARD_ATTACKS)
def test_hostile_shard_is_refused_on_read_and_reported_by_verify(attack, entry, tmp_path, image):
    make, fragment = SHARD_ATTACKS[attack]
    target = "shards/train-00001.h5"
    with h5py.File(entry / target, "a") as handle:
        make(handle, entry)
    _resize_record(entry, target)  # the manifest's size and SHA-256 agree: only the contents give it away
    with pytest.raises(CorruptCacheError, match=fragment):
        cache = open_cache(entry)
        cache.labels("train")
    assert_error(cli("fit-head", entry, "--name", "x", *FAST), 1, fragment)
    report = verify_entry(entry)
    assert any(p.file == target and fragment in p.what for p in report.problems), report.problems
    assert cli("verify", entry).exit_code == 1
    repaired = cli("verify", entry, "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert verify_entry(entry).ok


def test_a_flipped_byte_in_a_shards_paths_is_refused_on_read(entry, tmp_path):
    """`paths` (variable-length strings) cannot carry fletcher32: one flipped byte renamed a
    row and export-features wrote the wrong path, exit 0. It has its own checksum now."""
    shard = entry / "shards/train-00001.h5"
    data = bytearray(shard.read_bytes())
    with h5py.File(shard, "r") as handle:
        first = handle["paths"][0]
    at = data.find(first)
    assert at > 0
    data[at + len(first) - 5] ^= 0x01  # the image name's last character before ".png"
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="paths fails its checksum"):
        open_cache(entry).paths("train")
    assert_error(cli("export-features", entry, "-o", tmp_path / "out"), 1, "paths fails its checksum")
    assert_error(cli("predict", entry, "--head", "logistic", "--split", "train"), 1, "paths fails its checksum")


# ------------------------------------------------------------------ 3. the backbone checkpoint

def _flip_checkpoint(path):
    flip_byte(path, 1000)


def _truncate_checkpoint(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delete_checkpoint(path):
    path.unlink()


def _swap_checkpoint(path):
    """Another network's valid checkpoint under this name (another seed)."""
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(1)
    save_file({k: (torch.randn(v.shape, generator=generator) if v.is_floating_point() else v) for k, v in tensors.items()},
              str(path))


CHECKPOINT_ATTACKS = {"flipped-byte": _flip_checkpoint, "truncated": _truncate_checkpoint,
                      "deleted": _delete_checkpoint, "another-network": _swap_checkpoint}


@pytest.mark.parametrize("attack", CHECKPOINT_ATTACKS)
def test_damaged_checkpoint_is_refused_reported_and_restored(attack, entry, tmp_path, image, pristine):
    before = cli("predict", entry, image, "--head", "logistic")
    assert before.exit_code == 0, before.output
    CHECKPOINT_ATTACKS[attack](weights_file(entry))
    expected = {"deleted": "missing", "truncated": "unreadable"}.get(attack, "damaged")
    for command in (["predict", entry, image, "--head", "logistic"],
                    ["export", entry, "--head", "logistic", "-o", tmp_path / "m.pt"]):
        assert_error(cli(*command), 2 if attack == "deleted" else 1, expected, "verify --repair")
    report = verify_entry(entry)
    assert report.checkpoint_bad and any("_weights" in p.file and expected in p.what for p in report.problems)
    listing = cli("verify", entry)
    assert listing.exit_code == 1 and "_weights" in listing.stdout
    # extract of the same dataset is not a cache hit: it restores the checkpoint
    again = cli("extract", pristine[0] / "photos", "--model", "tiny", "--weights", "random", "--image-size", "32",
                "--precision", "fp32", "--dtype", "float32", "--batch-size", "4", "--workers", "0", "--shard-size",
                "4", "--root", entry.parent)
    assert again.exit_code == 0 and "cache hit" not in again.stdout and "restored" in again.stdout, again.output
    assert verify_entry(entry).ok
    after = cli("predict", entry, image, "--head", "logistic")
    assert after.stdout == before.stdout


@pytest.mark.parametrize("attack", CHECKPOINT_ATTACKS)
def test_verify_repair_rewrites_the_checkpoint_from_source_weights(attack, entry):
    CHECKPOINT_ATTACKS[attack](weights_file(entry))
    repaired = cli("verify", entry, "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert "repaired ../_weights/" in repaired.stdout
    assert verify_entry(entry).ok


def test_checkpoint_without_its_source_weights_says_what_to_do(tmp_path, pristine):
    """Made from a weights file that is gone: repair cannot rewrite it and says so."""
    weights = tmp_path / "mine.safetensors"
    save_file(load_file(str(weights_file(pristine[1]))), str(weights))
    entry = extract(spec_for(pristine[0] / "photos", tmp_path / "cache", weights=str(weights))).path
    weights.unlink()
    weights_file(entry).unlink()
    assert_error(cli("verify", entry, "--repair"), 1, "cannot be loaded to rewrite it", "extract again")


# ------------------------------------------------------------------ 4. heads

def head_path(entry, name="logistic"):
    return entry / "heads" / name / "head.safetensors"


def _nan_tensors(tensors):
    key = next(k for k in tensors if k.endswith("weight"))
    tensors[key][0, 0] = float("nan")


def _wrong_shape(tensors):
    key = next(k for k in tensors if k.endswith("classifier.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)


HEAD_ATTACKS = {  # id: (how, exit code, fragment)
    "flipped-tensor-byte": (lambda p: flip_byte(p, 50), 1, "fail their checksum"),
    "record-edited-checksum-kept": (lambda p: reseal(p, change_record=lambda r: r["headline"].update(top1=0.99),
                                                     keep_checksum=True), 1, "fails the checksum"),
    "checksum-stripped": (lambda p: _strip_checksum(p), 1, "carries no checksum"),
    "nan-tensor": (lambda p: reseal(p, change_tensors=_nan_tensors), 1, "NaN"),
    "wrong-shape-tensor": (lambda p: reseal(p, change_tensors=_wrong_shape), 1, "does not hold a valid"),
    "record-tap-path": (lambda p: reseal(p, change_record=lambda r: r.update(tap="../x")), 2, "field tap"),
    "record-classes-type": (lambda p: reseal(p, change_record=lambda r: r["config"].update(n_classes="2")), 2,
                            "field config.n_classes"),
    "record-name-other": (lambda p: reseal(p, change_record=lambda r: r.update(name="knn")), 2, "field name"),
    # resealed records that passed the schema and then crashed the report with a traceback
    "record-metrics-empty": (lambda p: reseal(p, change_record=lambda r: r.update(metrics={})), 2,
                             "headline.split 'test' has no metrics"),
    "record-chosen-type": (lambda p: reseal(p, change_record=lambda r: r.update(chosen="x")), 2, "field chosen"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:40]), 1, "unreadable"),
}


def _strip_checksum(path):
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "featurecache.checksum"}
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("attack", HEAD_ATTACKS)
def test_damaged_head_is_refused_and_reported(attack, entry, tmp_path, image):
    how, code, fragment = HEAD_ATTACKS[attack]
    how(head_path(entry))
    assert_error(cli("predict", entry, image, "--head", "logistic"), code, fragment)
    assert_error(cli("export", entry, "--head", "logistic", "-o", tmp_path / "m.pt"), code, fragment)
    # through an ensemble: a damaged member is named as damaged, not as changed since (which advised remaking
    # the ensemble); a member resealed with other tensors is a changed member, and stale is right
    through_vote = cli("predict", entry, image, "--head", "vote")
    if attack in ("nan-tensor", "wrong-shape-tensor"):
        assert_error(through_vote, 2, "ensemble 'vote' is stale: its member 'logistic' changed")
    else:
        assert "stale" not in assert_error(through_vote, code, fragment)
    report = verify_entry(entry)
    assert any(p.file == "heads/logistic/head.safetensors" for p in report.problems), report.problems
    assert cli("verify", entry).exit_code == (2 if code == 2 else 1)
    assert not (tmp_path / "m.pt").exists()
    # the leaderboard (records only: `verify` checks tensors) still shows the other heads, marks this one and
    # says why; it stopped at the first damaged record
    board = cli("heads", entry)
    if attack in ("flipped-tensor-byte", "nan-tensor", "wrong-shape-tensor"):
        assert board.exit_code == 0 and "damaged" not in board.output
        return
    assert board.exit_code == 1, board.output
    assert "logistic (damaged)" in board.stdout and "knn" in board.stdout and "vote" in board.stdout
    assert board.stderr.startswith("warning: head logistic is damaged: ") and fragment in board.stderr
    assert len(board.stderr.strip().splitlines()) == 1 and "Traceback" not in board.output


def test_the_report_of_a_head_with_damaged_tensors_is_written_without_its_mistakes(entry, tmp_path):
    """Its record is sound (heads cannot tell), but its tensors fail their checksum: the page
    was not written at all. Now everything but the mistakes is, with a warning and exit 1."""
    flip_byte(head_path(entry), 50)
    result = cli("report", entry, "--head", "logistic", "-o", tmp_path / "page.html")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("warning: the mistakes of head logistic are left out of the page: ")
    assert "fail their checksum" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    page = (tmp_path / "page.html").read_text()
    assert "Leaderboard" in page and "confusion matrix" in page and "left out of the page" in page
    assert "No mistakes" not in page


@pytest.mark.parametrize("how", ["deleted", "dangling-link"])
def test_a_head_whose_file_is_gone_is_listed_as_damaged(entry, tmp_path, how):
    """heads listed only folders with a head file: a deleted one vanished from the board, exit 0."""
    head_path(entry, "knn").unlink()
    if how == "dangling-link":
        head_path(entry, "knn").symlink_to(tmp_path / "nowhere")
    board = cli("heads", entry)
    assert board.exit_code == 1 and "knn (damaged)" in board.stdout and "logistic" in board.stdout, board.output
    assert board.stderr.startswith("warning: head knn is damaged: its head.safetensors is missing; fit head 'knn' "
                                   "again"), board.stderr


def test_the_report_marks_a_damaged_head_and_shows_the_others(entry, tmp_path):
    HEAD_ATTACKS["record-edited-checksum-kept"][0](head_path(entry))
    result = cli("report", entry, "-o", tmp_path / "page.html")
    assert result.exit_code == 1, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("warning: head logistic is damaged and left out of the page: ")
    assert "fails the checksum" in result.stderr
    page = (tmp_path / "page.html").read_text()
    assert "logistic (damaged)" in page and "logistic is damaged and left out" in page
    assert "knn" in page and "vote" in page


@pytest.mark.parametrize("damage", ["edited", "garbage"])
def test_an_edited_head_json_is_reported_and_written_again(damage, entry):
    """head.json is the record's copy for people and tools; the sealed record decides, and
    an edited copy passed verify as ok while telling tools another C or other classes."""
    copy = entry / "heads" / "logistic" / "head.json"
    sealed = json.loads(copy.read_text())
    if damage == "edited":
        edit_json(copy, lambda r: r["config"]["params"].update(C=123.0))
    else:
        copy.write_text("garbage")
    report = verify_entry(entry)
    assert [p.file for p in report.problems] == ["heads/logistic/head.json"], report.problems
    assert "differs from the head's sealed record" in report.problems[0].what
    assert cli("verify", entry).exit_code == 1
    assert cli("verify", entry, "--repair").exit_code == 0
    assert json.loads(copy.read_text()) == sealed and verify_entry(entry).ok


def test_a_diverged_head_is_not_saved(entry, monkeypatch):
    from featurecache.heads.logistic import LogisticHead

    original = LogisticHead._fit

    def diverge(self, *args, **kwargs):
        original(self, *args, **kwargs)
        with torch.no_grad():
            self.network_.classifier.weight.fill_(float("nan"))

    monkeypatch.setattr(LogisticHead, "_fit", diverge)
    with pytest.raises(HeadError, match="NaN"):
        fit_head(entry, FitSpec(head="logistic", name="diverged", params={"C": 1.0}))
    assert not (entry / "heads" / "diverged" / "head.safetensors").exists()


# ------------------------------------------------------------------ 5. names never collide silently

def test_ensemble_cannot_take_a_members_name(entry, image):
    before = cli("predict", entry, image, "--head", "logistic").stdout
    for extra in ([], ["--overwrite"]):
        assert_error(cli("ensemble", entry, "logistic", "knn", "--name", "logistic", *extra), 2, "its member")
    assert read_record(open_cache(entry), "logistic")["head"] == "logistic"
    for command in (["predict", entry, image, "--head", "logistic"], ["predict", entry, image, "--head", "vote"],
                    ["heads", entry], ["report", entry]):
        assert cli(*command).exit_code == 0
    assert cli("predict", entry, image, "--head", "logistic").stdout == before


def test_existing_head_names_need_overwrite(entry):
    assert_error(cli("fit-head", entry, "--head", "logistic", *FAST), 2, "already exists", "--overwrite")
    assert_error(cli("ensemble", entry, "logistic", "--name", "knn"), 2, "already exists")
    assert_error(cli("ensemble", entry, "knn", "logistic", "--name", "vote"), 2, "already exists")
    assert cli("ensemble", entry, "knn", "logistic", "--name", "vote", "--overwrite").exit_code == 0
    assert cli("fit-head", entry, "--head", "logistic", *FAST, "--overwrite").exit_code == 0


def test_an_ensemble_cannot_contain_itself(entry, image):
    assert cli("ensemble", entry, "vote", "knn", "--name", "outer").exit_code == 0
    assert_error(cli("ensemble", entry, "outer", "--name", "vote", "--overwrite"), 2, "contain itself")
    assert cli("predict", entry, image, "--head", "outer").exit_code == 0


def test_names_that_escape_their_folder_are_refused(entry):
    for name in ("../../x", "/tmp/x", ".hidden", "a/b", ""):
        assert_error(cli("fit-head", entry, "--name", name, *FAST), 2, "name")
        assert_error(cli("ensemble", entry, "logistic", "--name", name), 2, "name")
        assert_error(cli("finetune", entry, "--name", name, "--epochs", "1"), 2, "name")
    assert_error(cli("ensemble", entry, "../heads/logistic", "knn", "--name", "v"), 2, "name")
    assert not (entry.parent / "x").exists()


def test_concurrent_fits_of_one_name_leave_one_consistent_head(entry):
    errors: list[BaseException] = []
    cache = open_cache(entry)

    def fit(C):
        try:
            fit_head(cache, FitSpec(head="logistic", name="race", params={"C": C}, overwrite=True))
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=fit, args=(C,)) for C in (0.5, 2.0, 0.5, 2.0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    head, record = load_head(cache, "race")
    copy = json.loads((entry / "heads" / "race" / "head.json").read_text())
    assert copy == record  # the readable copy is the same write's
    assert not [p for p in (entry / "heads" / "race").iterdir() if ".tmp-" in p.name]
    assert verify_entry(entry).ok


def test_concurrent_fits_without_overwrite_one_wins(entry):
    outcomes: list[object] = []
    cache = open_cache(entry)

    def fit():
        try:
            outcomes.append(fit_head(cache, FitSpec(head="logistic", name="race", params={"C": 1.0})).name)
        except NameTakenError as error:
            outcomes.append(error)

    threads = [threading.Thread(target=fit) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(o, str) for o in outcomes) == 1 and len(outcomes) == 3, outcomes
    assert verify_entry(entry).ok


@pytest.mark.parametrize("folder, name", [("heads/logistic", ".head.safetensors.tmp-999999999-deadbeef"),
                                          ("heads/logistic", ".head.json.tmp-999999999-deadbeef"),
                                          ("report", ".report.html.tmp-999999999-deadbeef"),
                                          ("../_weights", ".x.safetensors.tmp-999999999-deadbeef")])
def test_temporary_files_of_killed_writers_are_reported_and_removed(folder, name, entry):
    (entry / folder).mkdir(parents=True, exist_ok=True)
    (entry / folder / name).write_bytes(b"partial")
    report = verify_entry(entry)
    assert any(p.file.endswith(name) and "temporary" in p.what for p in report.problems), report.problems
    if folder.startswith("heads"):  # the next write into the folder removes it
        fit_head(entry, FitSpec(head="logistic", params={"C": 1.0}, overwrite=True))
    else:
        assert cli("verify", entry, "--repair").exit_code == 0
    assert not (entry / folder / name).exists()


# ------------------------------------------------------------------ 6. stale ensembles

def test_ensemble_is_stale_once_a_member_changes(entry, image):
    assert cli("fit-head", entry, "--head", "logistic", "--param", "C=0.01", "--overwrite").exit_code == 0
    rows = {row["name"]: row for row in leaderboard(open_cache(entry))}
    assert rows["vote"]["stale"] and not rows["logistic"]["stale"]
    assert "(stale)" in cli("heads", entry).stdout
    assert_error(cli("predict", entry, image, "--head", "vote"), 2, "stale", "logistic")
    assert_error(cli("export", entry, "--head", "vote", "-o", entry.parent / "m.pt"), 2, "stale")
    with pytest.raises(StaleError):
        load_head(open_cache(entry), "vote")
    assert cli("ensemble", entry, "logistic", "knn", "--name", "vote", "--overwrite").exit_code == 0
    assert cli("predict", entry, image, "--head", "vote").exit_code == 0


def test_the_command_a_stale_ensemble_names_makes_the_same_ensemble_again(entry, image):
    made = make_ensemble(entry, ["logistic", "knn"], name="weighted", weights=[1.0, 3.0]).record
    assert cli("fit-head", entry, "--head", "knn", "--param", "k=1", "--overwrite").exit_code == 0
    line = assert_error(cli("predict", entry, image, "--head", "weighted"), 2, "stale", "'knn'")
    command = line.partition("make it again with featurecache ")[2].split()
    assert command[:2] == ["ensemble", entry.name] and cli(*command).exit_code == 0  # run as printed
    assert read_record(open_cache(entry), "weighted")["weights"] == made["weights"] == [0.25, 0.75]


def test_deleted_member_makes_the_ensemble_stale(entry, image):
    shutil.rmtree(entry / "heads" / "knn")
    assert_error(cli("predict", entry, image, "--head", "vote"), 2, "stale", "knn")


# ------------------------------------------------------------------ 7. honest figures

def _many_classes(root, n_classes, per_class, singles=0):
    seed = 1000
    for c in range(n_classes):
        count = 1 if c < singles else per_class
        for i in range(count):
            seed += 1
            write_image(root / f"class{c:03d}" / f"{i}.png", seed, size=16)


def test_automatic_validation_split_works_for_a_hundred_classes(tmp_path):
    _many_classes(tmp_path / "many", 100, 4, singles=3)  # 391 train images, no val split
    entry = extract(spec_for(tmp_path / "many", tmp_path / "cache", shard_size=512, batch_size=64)).path
    result = runner.invoke(app, ["fit-head", str(entry), *FAST])
    assert result.exit_code == 0, result.output
    record = read_record(open_cache(entry), "logistic")
    assert record["selection_split"] == "val (from train)"
    assert any("single training image" in note for note in record["notes"])
    labels = open_cache(entry).labels("train")
    train, val = _stratified_split(labels, 0.2, 0)
    assert not set(train) & set(val) and len(train) + len(val) == len(labels)
    assert abs(len(val) - 0.2 * (len(labels) - 3)) <= 1  # the fraction asked for
    counts = np.bincount(labels[train], minlength=100)
    assert counts.min() >= 1  # every class keeps a training row, the single-image classes included


@pytest.mark.parametrize("per_class, fraction", [(2, 0.2), (2, 0.9), (1, 0.2), (3, 0.5), (50, 0.1)])
def test_stratified_split_never_fails_and_keeps_every_class_in_train(per_class, fraction):
    labels = np.repeat(np.arange(100), per_class)
    if per_class == 1:
        with pytest.raises(HeadError, match="too few"):
            _stratified_split(labels, fraction, 0)
        return
    train, val = _stratified_split(labels, fraction, 0)
    assert np.bincount(labels[train], minlength=100).min() >= 1
    assert sorted([*train, *val]) == list(range(len(labels)))


def test_ensemble_is_scored_on_rows_none_of_its_members_trained_on(tmp_path, pristine):
    base = pristine[0]
    entry = extract(spec_for(base / "photos" / "train", tmp_path / "cache")).path  # no val split
    for head, params in (("logistic", {"C": 1.0}), ("knn", {"k": 3})):
        fit_head(entry, FitSpec(head=head, params=params, val_fraction=0.5, seed=3))
    result = make_ensemble(entry, ["logistic", "knn"], name="vote")
    member = read_record(open_cache(entry), "logistic")
    assert set(result.record["metrics"]) == {"val (from train)"}
    assert result.record["metrics"]["val (from train)"]["n"] == member["metrics"]["val (from train)"]["n"]
    assert result.record["metrics"]["val (from train)"]["n"] == member["rows"]["val (from train)"]
    labels = open_cache(entry).labels("train")
    train, val = _stratified_split(labels, 0.5, 3)
    assert len(val) == result.record["metrics"]["val (from train)"]["n"] and not set(train) & set(val)
    # members validated on different rows: refused
    fit_head(entry, FitSpec(head="knn", name="knn-other", params={"k": 3}, val_fraction=0.5, seed=4))
    assert_error(cli("ensemble", entry, "logistic", "knn-other", "--name", "mixed"), 2, "different rows")


def test_refitted_members_leave_only_the_test_split_to_score_on(entry):
    fit_head(entry, FitSpec(head="logistic", name="refitted", params={"C": 1.0}, refit=True))
    result = make_ensemble(entry, ["refitted", "knn"], name="vote-refit")
    assert set(result.record["metrics"]) == {"test"}


def test_per_class_chart_draws_what_it_says_and_keeps_labels(tmp_path):
    from featurecache.report import plots

    accuracy = {f"class{i:03d}": (i % 97) / 96 for i in range(200)}
    figure = plots.per_class_figure(accuracy, "per-class accuracy")
    axes = figure.axes[0]
    labels = [tick.get_text() for tick in axes.get_yticklabels()]
    worst = sorted(accuracy, key=accuracy.get)[:plots.MAX_LABELLED_CLASSES]
    assert labels == worst  # every bar labelled, lowest first ...
    assert axes.yaxis_inverted()  # ... and the first is drawn at the top
    assert "40 lowest of 200" in axes.get_title()
    small = plots.per_class_figure({"a": 0.9, "b": 0.1, "c": 0.5}, "t").axes[0]
    assert [t.get_text() for t in small.get_yticklabels()] == ["b", "c", "a"] and small.yaxis_inverted()
    matrix = np.eye(200, dtype=int) * 5
    matrix[3, 7] = matrix[150, 2] = 4
    confusion = plots.confusion_figure(matrix, list(accuracy), "confusion").axes[0]
    shown = [t.get_text() for t in confusion.get_yticklabels()]
    assert len(shown) == plots.CONFUSED_CLASSES and {"class003", "class007", "class150", "class002"} <= set(shown)
    assert "30 most confused of 200" in confusion.get_title()
    assert plots.confused_pairs(matrix, list(accuracy))[:2] == [("class003", "class007", 4, 4 / 9),
                                                                ("class150", "class002", 4, 4 / 9)]


# ------------------------------------------------------------------ 8. parameters validated up front

@pytest.mark.parametrize("arguments, fragment", [
    (["--head", "mlp", "--param", "hidden_sizes=256"], "hidden_sizes"),
    (["--head", "mlp", "--param", "dropout=2"], "dropout"),
    (["--head", "mlp", "--param", "dropout=\"x\""], "dropout"),
    (["--head", "knn", "--param", "k=\"x\""], "k must be"),
    (["--head", "knn", "--param", "temperature=\"x\""], "temperature"),
    (["--head", "logistic", "--param", "C=\"x\""], "C must be"),
    (["--head", "logistic", "--param", "Cs=[]"], "Cs must be"),
    (["--head", "logistic", "--param", "tol=-1"], "tol"),
    (["--head", "logistic", "--param", "max_iter=true"], "max_iter"),
    (["--head", "sklearn:linear_model.LogisticRegression", "--param", "C=-1"], "C"),
    (["--head", "sklearn:svm.LinearSVC", "--param", "penalty=\"l7\""], "penalty"),
    (["--head", "sklearn:ensemble.RandomForestClassifier", "--param", "n_estimators=2"], "cannot be saved"),
    (["--val-fraction", "1.5"], "val-fraction"),
    (["--val-fraction", "0"], "val-fraction"),
    # refit as a parameter refitted on train + val while the record said val was never trained on
    (["--head", "logistic", "--param", "refit=true"], "refit is not a head parameter: pass --refit"),
    (["--head", "logistic", "--refit", "--param", "refit=false"], "refit is not a head parameter"),  # a traceback
    (["--head", "logistic", "--param", "n_classes=3"], "n_classes is not a head parameter"),  # ignored, recorded
    (["--head", "logistic", "--param", "C=1", "--param", "C=2"], "--param C is given twice"),  # the last won
    # NaN probabilities were scored by argmax as class 0 and saved with exit 0
    (["--head", "knn", "--param", "temperature=1e-300", "--param", "k=[1,2]"], "no probability distribution for"),
    (["--head", "mlp", "--param", "lr=1e30", "--param", "epochs=3", "--param", "weight_decay=0"],
     "no probability distribution for"),
])
def test_bad_head_parameters_are_one_error_line(arguments, fragment, entry):
    assert_error(cli("fit-head", entry, "--name", "bad", *arguments), 2, fragment)
    assert not (entry / "heads" / "bad").exists()


def test_sklearn_estimator_holding_shared_arrays_is_saved_exactly(entry):
    """SVC keeps `_dual_coef_` as a view of `dual_coef_`; safetensors refuses shared memory."""
    result = cli("fit-head", entry, "--head", "sklearn:svm.SVC", "--param", "probability=false")
    assert result.exit_code == 0, result.output
    cache = open_cache(entry)
    head, _ = load_head(cache, "sklearn-svm.SVC")
    features = cache.features("test").reshape(cache.splits["test"], -1)
    assert head.predict_proba(features).shape == (len(features), 2)
    assert verify_entry(entry).ok
    assert_error(cli("fit-head", entry, "--head", "sklearn:linear_model.LogisticRegressionCV", "--name", "cv"), 2,
                 "cannot be saved")


@pytest.mark.parametrize("arguments, fragment", [
    (["", "--weights", "random"], "empty"),
    (["   ", "--weights", "random"], "empty"),
    (["digits", "--weights", ""], "empty"),
    (["digits", "--weights", "random", "--image-size", "0"], "image-size"),
    (["digits", "--weights", "random", "--image-size", "100000"], "image-size"),
    (["digits", "--weights", "random", "--seed", "-1"], "seed"),
    (["digits", "--weights", "random", "--tap", "nope"], "tap"),
])
def test_bad_extract_parameters_are_one_error_line(arguments, fragment, tmp_path):
    assert_error(cli("extract", *arguments, "--root", tmp_path / "c"), 2, fragment)
    assert not list((tmp_path / "c").rglob("*.h5")) if (tmp_path / "c").exists() else True


def test_checkpoint_of_another_architecture_says_which_it_is(tmp_path):
    from featurecache.backbones.weights import resolve_weights
    from featurecache.backbones.registry import get_backbone

    weights = tmp_path / "r18.safetensors"
    save_file(resolve_weights(get_backbone("tiny"), "random").state_dict, str(weights),
              metadata={"featurecache.arch": "tiny"})
    assert_error(cli("extract", "digits", "--model", "resnet18", "--weights", weights, "--root", tmp_path / "c"), 2,
                 "saved from tiny", "--model tiny")
    plain = tmp_path / "r18.pt"
    torch.save(resolve_weights(get_backbone("resnet18"), "random").state_dict, plain)
    assert_error(cli("extract", "digits", "--model", "resnet34", "--weights", plain, "--root", tmp_path / "c"), 2,
                 "saved from resnet18")


def test_bad_finetune_parameters_are_one_error_line(entry):
    for arguments, fragment in ((["--lr", "-1"], "--lr"), (["--weight-decay", "nan"], "weight-decay"),
                                (["--seed", "-5"], "seed"), (["--head", "../x"], "name")):
        assert_error(cli("finetune", entry, "--epochs", "1", *arguments), 2, fragment)


# ------------------------------------------------------------------ 9. disk full, read-only, permissions

def _failing(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("code, fragment", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"),
                                            (errno.EACCES, "permission denied")])
def test_saving_a_head_that_cannot_be_written(code, fragment, entry, monkeypatch):
    import safetensors
    import safetensors.torch

    real = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # a partial file under the temporary name ...
        raise OSError(code, os.strerror(code))  # ... then the disk gives out

    def as_safetensors_says_it(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # the message its Rust writer gives (seen on a full disk)
        raise safetensors.SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    for failing in (half_then_fail, as_safetensors_says_it):
        monkeypatch.setattr(safetensors.torch, "save_file", failing)
        assert_error(cli("fit-head", entry, "--name", "new", *FAST), 1, fragment, "heads/new/head.safetensors")
        assert not (entry / "heads" / "new" / "head.safetensors").exists()
        assert not [p for p in entry.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize("command", ["report", "export"])
def test_report_and_export_on_a_full_disk(command, entry, tmp_path, monkeypatch):
    monkeypatch.setattr(integrity.os, "replace", _failing(errno.ENOSPC))
    output = tmp_path / "out" / ("report.html" if command == "report" else "model.pt")
    arguments = ["report", entry, "-o", output] if command == "report" else \
        ["export", entry, "--head", "logistic", "-o", output]
    assert_error(cli(*arguments), 1, "disk is full")
    assert not output.parent.exists()  # no page, no temporary file, and the folder it made is gone


def test_storing_the_checkpoint_on_a_full_disk(tmp_path, pristine, monkeypatch):
    monkeypatch.setattr(integrity.os, "replace", _failing(errno.ENOSPC))
    result = cli("extract", pristine[0] / "photos", "--model", "tiny", "--weights", "random", "--image-size", "32",
                 "--root", tmp_path / "c")
    assert_error(result, 1, "disk is full", "backbone checkpoint")
    assert not list((tmp_path / "c" / "_weights").glob("*.safetensors"))
    assert not [p for p in (tmp_path / "c").rglob("*") if ".tmp-" in p.name]


def test_unwritable_cache_root(tmp_path, pristine, monkeypatch):
    from pathlib import Path

    real = Path.mkdir

    def refuse(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "locked")):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert_error(cli("extract", pristine[0] / "photos", "--model", "tiny", "--weights", "random", "--root",
                     tmp_path / "locked"), 1, "permission denied")


def test_unreadable_class_folder_is_reported_not_an_empty_class(tmp_path, monkeypatch):
    for label in ("ants", "bees"):
        write_image(tmp_path / "photos" / label / "a.png", 1)
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith("bees"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(SourceError, match="cannot read the folder .*bees.*permission denied"):
        sources.open_source(str(tmp_path / "photos"))


# ------------------------------------------------------------------ 10. names that are not UTF-8, offline

def test_file_names_that_are_not_utf8_are_skipped_with_a_reason(tmp_path):
    folder = tmp_path / "photos" / "train" / "ants"
    write_image(folder / "good.png", 1)
    write_image(folder / "also_good.png", 2)
    bad = os.path.join(os.fsencode(folder), b"bad\xff\xfe.png")
    shutil.copy(folder / "good.png", bad)
    write_image(tmp_path / "photos" / "train" / "bees" / "bee.png", 3)  # two classes: a layout that is accepted
    result = cli("extract", tmp_path / "photos", "--model", "tiny", "--weights", "random", "--image-size", "32",
                 "--root", tmp_path / "c")
    assert result.exit_code == 0, result.output
    manifest = json.loads(next((tmp_path / "c").glob("*/manifest.json")).read_text())
    assert manifest["splits"]["train"] == 3
    assert [s["reason"] for s in manifest["skipped"]] == ["file name is not valid UTF-8; rename it to include it"]
    assert "\\xff\\xfe" in manifest["skipped"][0]["path"]
    assert cli("predict", next((tmp_path / "c").glob("*")), folder, "--head", "x").exit_code == 2  # no head: no crash


def test_offline_missing_weights_suggests_random(tmp_path):
    assert_error(cli("extract", "digits", "--model", "resnet18", "--root", tmp_path / "c"), 2,
                 "not on this machine", "--weights random")



# ------------------------------------------------------------------ 11. finetune outputs, pipelines

@pytest.fixture
def finetuned(entry):
    """The entry with one finetune run (1 epoch, from the images, tiny)."""
    from featurecache.finetune.stage import FinetuneSpec, finetune

    finetune(entry, FinetuneSpec(head="logistic", epochs=1, batch_size=4, workers=0, augment=False, name="ft"))
    return entry


FINETUNE_ATTACKS = {
    "backbone-flipped-byte": (lambda d: flip_byte(d / "backbone.safetensors", 100), "fail their checksum"),
    "head-nan": (lambda d: _nan_finetune_head(d / "head.safetensors"), "NaN"),
    "record-edited": (lambda d: edit_json(d / "finetune.json", lambda r: r.update(best_val_top1=1.0)),
                      "fails its checksum"),
}


def _nan_finetune_head(path):
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items()
                    if k not in ("featurecache.tensors", "featurecache.checksum")}
    key = next(k for k in tensors if k.endswith("weight") and tensors[k].ndim == 2)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata=seal(metadata, tensors))


@pytest.mark.parametrize("attack", FINETUNE_ATTACKS)
def test_damaged_finetune_output_is_refused_and_reported(attack, finetuned, image):
    how, fragment = FINETUNE_ATTACKS[attack]
    assert cli("predict", finetuned, image, "--finetune", "ft").exit_code == 0
    how(finetuned / "finetune" / "ft")
    assert_error(cli("predict", finetuned, image, "--finetune", "ft"), 1, fragment)
    report = verify_entry(finetuned)
    assert any(p.file.startswith("finetune/ft/") and fragment in p.what for p in report.problems), report.problems


def test_damaged_finetune_checkpoint_asks_for_restart(finetuned):
    from featurecache.finetune.stage import FinetuneSpec, finetune

    flip_byte(finetuned / "finetune" / "ft" / "checkpoint.safetensors", 60)
    spec = FinetuneSpec(head="logistic", epochs=2, batch_size=4, workers=0, augment=False, name="ft")
    with pytest.raises(FeatureCacheError, match="damaged.*--restart"):
        finetune(finetuned, spec)


def test_finetune_checkpoint_on_a_full_disk(entry, monkeypatch):
    monkeypatch.setattr(integrity.os, "replace", _failing(errno.ENOSPC))
    assert_error(cli("finetune", entry, "--head", "logistic", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                     "--no-augment", "--name", "full"), 1, "disk is full")
    assert not list((entry / "finetune" / "full").glob("*.safetensors"))
    assert not [p for p in entry.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize("table, fragment", [
    ('[[heads]]\nhead = "logistic"\nname = "../../x"\n', "heads[1].name"),
    ('[[heads]]\nhead = "logistic"\nval_fraction = 1.5\n', "heads[1].val_fraction"),
    ('[[heads]]\nhead = "mlp"\nparams = { hidden_sizes = 256 }\n', "heads[1].params"),
    ('[[heads]]\nhead = "logistic"\n[ensemble]\nmembers = ["logistic"]\nname = "logistic"\n', "ensemble.name"),
    ('[report]\nworst = -1\n', "report.worst"),
    ('[finetune]\nlr = -1.0\n', "finetune.lr"),
])
def test_run_check_names_file_line_and_field(table, fragment, tmp_path):
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[extract]\nsource = "digits"\nmodel = "tiny"\nweights = "random"\nimage_size = 32\n'
                        + table)
    line = assert_error(cli("run", pipeline, "--check"), 2, str(pipeline), fragment)
    assert line.split(":")[2].isdigit()  # file:line: field
    extract_line = '[extract]\nsource = "digits"\nmodel = "tiny"\nweights = "random"\nimage_size = 0\n'
    pipeline.write_text(extract_line)
    assert_error(cli("run", pipeline, "--check"), 2, f"{pipeline}:5: extract.image_size")
