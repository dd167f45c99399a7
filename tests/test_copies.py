"""Byte-identical images across splits or classes (featurecache/data/copies.py): reported as
warnings, found by size then by hash, never by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from featurecache.data import copies
from featurecache.data.copies import copy_records, copy_warnings, find_copies, merge_records
from featurecache.data.sources import Sample

from helpers import stderr_lines, write_image, write_photo_folder


def _listing(root: Path, layout: dict[str, list[tuple[str, int]]]) -> list[Sample]:
    """root/<split>/<class>/<n>.png for (class, seed) pairs; the same seed, the same bytes."""
    classes = sorted({c for items in layout.values() for c, _ in items})
    samples = []
    for split, items in layout.items():
        for n, (name, seed) in enumerate(items):
            relpath = f"{split}/{name}/{n}.png"
            write_image(root / relpath, seed)
            samples.append(Sample(relpath, classes.index(name), split, "", len(samples)))
    return samples


def _pairs(found) -> list[tuple[str, str]]:
    return [(pair.copy.path, pair.original.path) for pair in found]


def test_copies_across_splits_and_classes_are_found_by_content(tmp_path):
    samples = _listing(tmp_path, {"train": [("cat", 1), ("cat", 2), ("dog", 3), ("dog", 1)],
                                  "test": [("cat", 2), ("cat", 4), ("dog", 3), ("dog", 5)]})
    found = find_copies(samples, lambda s: tmp_path / s.path)
    # train/dog/3 copies train/cat/0 (another class); test/cat/0 and test/dog/2 copy train images
    assert _pairs(found) == [("train/dog/3.png", "train/cat/0.png"), ("test/cat/0.png", "train/cat/1.png"),
                             ("test/dog/2.png", "train/dog/2.png")]  # in listing order
    warnings = copy_warnings(copy_records(found, ["cat", "dog"]))
    assert warnings == [
        "2 test image(s) are byte-identical copies of train images (test/cat/0.png = train/cat/1.png, "
        "test/dog/2.png = train/dog/2.png): they are scored on images a head was fitted on, so test figures "
        "read high; remove the copies from one split",
        "1 train image(s) are byte-identical copies of train images under another class (train/dog/3.png = "
        "train/cat/0.png; e.g. dog and cat): one label of each pair is wrong; remove or relabel the copies"]


def test_copies_in_one_class_of_one_split_are_no_concern_and_not_read(tmp_path, monkeypatch):
    samples = _listing(tmp_path, {"train": [("cat", 1), ("cat", 1), ("dog", 2)], "test": [("cat", 3)]})
    monkeypatch.setattr(copies, "_digest", lambda content, limit: pytest.fail(f"{content} was read"))
    assert find_copies(samples, lambda s: tmp_path / s.path) == []


def test_same_size_other_bytes_are_not_copies_even_past_the_first_pass(tmp_path, monkeypatch):
    # one byte differs after the first pass's prefix: only the whole-file pass tells them apart
    monkeypatch.setattr(copies, "HEAD_BYTES", 64)
    samples = _listing(tmp_path, {"train": [("cat", 1)], "test": [("cat", 1), ("cat", 1)]})
    changed = tmp_path / "test/cat/1.png"
    data = bytearray(changed.read_bytes())
    data[-20] ^= 0xFF
    changed.write_bytes(bytes(data))
    assert len(data) > 64
    assert _pairs(find_copies(samples, lambda s: tmp_path / s.path)) == [("test/cat/0.png", "train/cat/0.png")]


def test_only_groups_with_a_new_row_are_read(tmp_path, monkeypatch):
    samples = _listing(tmp_path, {"train": [("cat", 1), ("dog", 2)], "test": [("cat", 1), ("dog", 2)]})
    read: list[str] = []
    real = copies._digest
    monkeypatch.setattr(copies, "_digest", lambda content, limit: read.append(Path(content).name) or
                        real(content, limit))
    new = {"test/cat/0.png"}
    found = find_copies(samples, lambda s: tmp_path / s.path, new=lambda s: s.path in new)
    assert _pairs(found) == [("test/cat/0.png", "train/cat/0.png")]
    assert sorted(read) == ["0.png", "0.png"]  # the cat pair only: the dog pair holds no new row
    # alike in size, but only the copies holding a new row are reported
    monkeypatch.undo()
    samples = [Sample(f"x/{i}", 0, split, "", i) for i, split in enumerate(["train", "train", "test", "test"])]
    pixels = {0: b"a" * 300, 1: b"b" * 300, 2: b"a" * 300, 3: b"b" * 300}
    found = find_copies(samples, lambda s: pixels[s.index], new=lambda s: s.index == 3)
    assert _pairs(found) == [("x/3", "x/1")]


def test_unreadable_and_missing_files_are_left_to_extraction(tmp_path):
    samples = _listing(tmp_path, {"train": [("cat", 1)], "test": [("cat", 1), ("dog", 1)]})
    (tmp_path / "test/cat/0.png").unlink()
    shutil.copy(tmp_path / "train/cat/0.png", tmp_path / "test/dog/1.png")
    assert _pairs(find_copies(samples, lambda s: tmp_path / s.path)) == [("test/dog/1.png", "train/cat/0.png")]


def test_in_memory_images_are_compared_as_bytes():
    samples = [Sample(f"x/{i}", label, split, "", i) for i, (label, split) in
               enumerate([(0, "train"), (1, "train"), (0, "test"), (1, "test")])]
    pixels = {0: b"a" * 300, 1: b"b" * 300, 2: b"b" * 300, 3: b"c" * 300}
    assert _pairs(find_copies(samples, lambda s: pixels[s.index])) == [("x/2", "x/1")]


def test_a_warning_names_a_few_pairs(tmp_path):
    samples = _listing(tmp_path, {"train": [("cat", i) for i in range(5)], "test": [("cat", i) for i in range(5)]})
    (warning,) = copy_warnings(copy_records(find_copies(samples, lambda s: tmp_path / s.path), ["cat"]))
    assert warning.startswith("5 test image(s) are byte-identical copies of train images (test/cat/0.png = "
                              "train/cat/0.png, test/cat/1.png = train/cat/1.png, test/cat/2.png = train/cat/2.png, ...)")


def test_an_earlier_runs_records_are_kept_only_while_both_images_are_unchanged():
    def record(path, original):
        return {"path": path, "split": "test", "label": "cat", "original": original, "original_split": "train",
                "original_label": "cat"}

    listed = [Sample(p, 0, p.split("/")[0], "", i) for i, p in
              enumerate(["train/a", "train/b", "train/c", "train/z", "test/a", "test/b", "test/c"])]
    previous = [record("test/a", "train/a"), record("test/b", "train/b"), record("test/c", "train/c"),
                record("test/gone", "train/a")]
    # a new train/z alike test/a and train/a: their group is read again and the pair found again
    fresh = [record("test/a", "train/a"), record("test/c", "train/a")]
    merged = merge_records(previous, fresh, listed, new=lambda s: s.path in ("train/b", "test/c", "train/z"))
    # test/b: its original was read again (and found no longer alike); test/c: read again, a new pair;
    # test/gone: no longer listed; test/a once
    assert merged == [record("test/a", "train/a"), record("test/c", "train/a")]


def _extract(runner, root: Path, cache_root: Path):
    from featurecache.cli import app

    return runner.invoke(app, ["extract", str(root), "--weights", "random", "--model", "resnet18", "--image-size",
                               "32", "--workers", "0", "--root", str(cache_root)])


def _warnings(result) -> list[str]:
    return [line for line in stderr_lines(result) if line.startswith("warning:")]


def test_extract_fit_head_and_the_report_say_which_images_are_copies(tmp_path):
    """A test image copied from train is scored on what the head learnt; nothing said so."""
    from typer.testing import CliRunner

    from featurecache import open_cache
    from featurecache.cli import app
    from featurecache.fit.headstore import read_record

    runner = CliRunner()
    root = write_photo_folder(tmp_path / "d", (("train", 3), ("test", 2)))
    shutil.copy(root / "train/ants/ants_0.png", root / "test/ants/copy.png")
    shutil.copy(root / "train/bees/bees_1.png", root / "train/ants/relabelled.png")
    cache_root = tmp_path / "cache"
    across = ("warning: 1 test image(s) are byte-identical copies of train images (test/ants/copy.png = "
              "train/ants/ants_0.png): they are scored on images a head was fitted on, so test figures read high; "
              "remove the copies from one split")
    relabelled = ("warning: 1 train image(s) are byte-identical copies of train images under another class "
                  "(train/bees/bees_1.png = train/ants/relabelled.png; e.g. bees and ants): one label of each pair is "
                  "wrong; remove or relabel the copies")
    first = _extract(runner, root, cache_root)
    assert first.exit_code == 0, first.output
    assert _warnings(first) == [across, relabelled]
    entry = next(p for p in cache_root.iterdir() if p.name != "_weights")
    assert [(c["path"], c["original"]) for c in open_cache(entry).manifest["copies"]] == [
        ("train/bees/bees_1.png", "train/ants/relabelled.png"), ("test/ants/copy.png", "train/ants/ants_0.png")]
    again = _extract(runner, root, cache_root)
    assert "cache hit" in again.stdout and _warnings(again) == [across, relabelled]  # said again on a hit
    fitted = runner.invoke(app, ["fit-head", str(entry), "--head", "knn"])
    assert fitted.exit_code == 0, fitted.output
    assert _warnings(fitted) == [across, relabelled]
    assert read_record(open_cache(entry), "knn")["notes"] == [across[9:], relabelled[9:]]
    report = runner.invoke(app, ["report", str(entry)])
    assert report.exit_code == 0, report.output
    page = (entry / "report" / "report.html").read_text()
    assert "test/ants/copy.png = train/ants/ants_0.png" in page and "one label of each pair is wrong" in page
    # the copies removed: the next run computes nothing new, reads no file again, and says nothing
    (root / "test/ants/copy.png").unlink()
    (root / "train/ants/relabelled.png").unlink()
    cleaned = _extract(runner, root, cache_root)
    assert cleaned.exit_code == 0 and _warnings(cleaned) == []
    assert open_cache(entry).manifest["copies"] == []


def test_a_copy_added_later_is_found_and_the_earlier_ones_kept(tmp_path):
    from typer.testing import CliRunner

    from featurecache import open_cache

    runner = CliRunner()
    root = write_photo_folder(tmp_path / "d", (("train", 3), ("test", 2)))
    shutil.copy(root / "train/ants/ants_0.png", root / "test/ants/copy.png")
    cache_root = tmp_path / "cache"
    assert _extract(runner, root, cache_root).exit_code == 0
    shutil.copy(root / "train/bees/bees_2.png", root / "test/bees/later.png")
    added = _extract(runner, root, cache_root)
    assert added.exit_code == 0, added.output
    assert _warnings(added)[0].startswith("warning: 2 test image(s) are byte-identical copies of train images "
                                          "(test/ants/copy.png = train/ants/ants_0.png, test/bees/later.png = "
                                          "train/bees/bees_2.png)")
    entry = next(p for p in cache_root.iterdir() if p.name != "_weights")
    assert [c["path"] for c in open_cache(entry).manifest["copies"]] == ["test/ants/copy.png", "test/bees/later.png"]


def test_every_kind_of_source_is_compared(tmp_path):
    """Arrays are compared by their pixels, torchvision datasets and path lists by their files."""
    import numpy as np
    import torchvision

    from featurecache.data.python_objects import from_python

    rng = np.random.default_rng(0)
    train, labels = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), np.array([0, 1, 0, 1])
    test = np.stack([train[1], rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)])
    arrays = from_python({"train": (train, labels), "test": (test, np.array([1, 0]))})
    assert _pairs(find_copies(arrays.samples, arrays.content)) == [(arrays.samples[4].path, arrays.samples[1].path)]

    root = write_photo_folder(tmp_path / "d", (("train", 2), ("test", 1)))
    shutil.copy(root / "train/bees/bees_1.png", root / "test/bees/copy.png")
    parts = {split: torchvision.datasets.ImageFolder(str(root / split)) for split in ("train", "test")}
    folders = from_python(parts)
    assert _pairs(find_copies(folders.samples, folders.content)) == [("test/bees/copy.png", "train/bees/bees_1.png")]
    listed = from_python([(str(root / "train/bees/bees_1.png"), "bees", "train"),
                          (str(root / "train/ants/ants_0.png"), "ants", "train"),
                          (str(root / "test/bees/copy.png"), "bees", "test")])
    assert [(p.copy.split, p.original.split) for p in find_copies(listed.samples, listed.content)] == [
        ("test", "train")]


def test_in_memory_images_are_not_all_held_at_once():
    """Each array image's bytes were kept until the end: an HF dataset's whole image column in memory."""
    import tracemalloc

    import numpy as np

    from featurecache.data.sources import ArraySource

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2000, 64, 64, 3), dtype=np.uint8)  # 24 MB, every image one size
    source = ArraySource("a", "a", ["x", "y"], images, np.arange(2000) % 2, ["train"] * 1500 + ["test"] * 500)
    tracemalloc.start()
    try:
        assert find_copies(source.samples, source.content) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < images.nbytes / 4, (peak, images.nbytes)


def test_a_pair_that_lost_its_original_is_read_again(tmp_path):
    """train/cat/a, train/dog/d and test/dog/b held the same bytes, recorded as d = a and b = a. With
    a deleted, both records were dropped and nothing read the group again: b = d went unsaid."""
    from typer.testing import CliRunner

    runner = CliRunner()
    root = write_photo_folder(tmp_path / "d", (("train", 2), ("test", 1)), labels=("cat", "dog"))
    write_image(root / "train/cat/a.png", 99)
    shutil.copy(root / "train/cat/a.png", root / "train/dog/d.png")
    shutil.copy(root / "train/cat/a.png", root / "test/dog/b.png")
    cache_root = tmp_path / "cache"
    first = _extract(runner, root, cache_root)
    assert first.exit_code == 0 and len(_warnings(first)) == 2, first.output
    (root / "train/cat/a.png").unlink()
    again = _extract(runner, root, cache_root)
    assert again.exit_code == 0, again.output
    assert _warnings(again) == ["warning: 1 test image(s) are byte-identical copies of train images "
                                "(test/dog/b.png = train/dog/d.png): they are scored on images a head was fitted on, "
                                "so test figures read high; remove the copies from one split"]


def test_copies_in_an_unlabelled_split_are_recorded_but_not_warned_of():
    """An unlabelled split is never scored: a train image in it misleads no figure. Val is where a
    head is chosen, not fitted."""
    def record(split, label, original_split, original_label):
        return {"path": f"{split}/x.png", "split": split, "label": label, "original": f"{original_split}/y.png",
                "original_split": original_split, "original_label": original_label}

    assert copy_warnings([record("pool", "", "train", "cat"), record("pool", "", "pool", "")]) == []
    (warning,) = copy_warnings([record("test", "cat", "val", "cat")])
    assert "they are scored on images a head was chosen on, so test figures read high" in warning
