"""Named layouts on miniature replicas in the exact on-disk format: every image gets its
official label and split, incomplete roots are one error line naming the layout."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from featurecache import FitSpec, extract, fit_head, open_cache
from featurecache.cli import app
from featurecache.errors import SourceError
from featurecache.data.sources import UNLABELED, open_source

import replicas

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()


def _labels_by_path(source) -> dict[str, tuple[str, str | None]]:
    names = source.class_ids or source.classes
    return {s.path: (s.split, None if s.label == UNLABELED else names[s.label]) for s in source.samples}


@pytest.mark.parametrize("given", ["parent", "dataset folder"])
def test_tinyimagenet_official_labels_and_splits(tmp_path, given):
    truth = replicas.tiny_imagenet(tmp_path)
    root = tmp_path if given == "parent" else tmp_path / "tiny-imagenet-200"
    source = open_source(f"tinyimagenet:{root}")
    assert source.class_ids == sorted(replicas.TINY_WNIDS)
    assert source.classes == ["goldfish", "European fire salamander", "bullfrog"]
    assert source.split_counts() == {"train": 18, "val": 9, "test": 4}
    assert source.unlabeled_splits == ["test"]
    assert _labels_by_path(source) == truth  # every image: its official split and wnid


def test_food101_official_labels_and_splits(tmp_path):
    truth = replicas.food101(tmp_path)
    source = open_source(f"food101:{tmp_path}")
    assert source.classes == replicas.FOOD_CLASSES
    assert source.split_counts() == {"train": 15, "test": 9}
    assert source.unlabeled_splits == []
    assert _labels_by_path(source) == truth


def test_tinyimagenet_end_to_end_sane_accuracy_and_unlabeled_test(tmp_path, tiny_spec):
    replicas.tiny_imagenet(tmp_path / "data")
    result = extract(tiny_spec(f"tinyimagenet:{tmp_path / 'data'}"))
    assert result.splits == {"train": 18, "val": 9, "test": 4} and result.unlabeled_splits == ["test"]
    cache = open_cache(result.path)
    assert cache.unlabeled_splits == ["test"] and cache.labeled_splits == {"train": 18, "val": 9}
    assert (cache.labels("test") == -1).all()
    assert cache.manifest["class_ids"] == sorted(replicas.TINY_WNIDS)
    record = fit_head(cache, FitSpec(head="logistic")).record
    assert set(record["metrics"]) == {"val"}  # the unlabelled test is never scored
    assert record["metrics"]["val"]["top1"] >= 0.8  # colours per class: a sane accuracy, not 0%
    held_out = fit_head(cache, FitSpec(head="logistic", name="carved", val_fraction=0.34)).record
    assert held_out["selection_split"] == "val (from train)" and held_out["headline"]["split"] == "val"
    assert "held-out" in held_out["headline"]["note"] and held_out["headline"]["top1"] >= 0.8


def test_food101_end_to_end_sane_accuracy(tmp_path, tiny_spec):
    replicas.food101(tmp_path)
    cache = open_cache(extract(tiny_spec(f"food101:{tmp_path}")).path)
    assert cache.splits == {"train": 15, "test": 9} and cache.classes == replicas.FOOD_CLASSES
    record = fit_head(cache, FitSpec(head="logistic")).record
    assert record["headline"]["split"] == "test" and record["headline"]["top1"] >= 0.8


@pytest.mark.parametrize("damage, fragment", [
    (lambda b: (b / "wnids.txt").unlink(), "no wnids.txt"),
    (lambda b: (b / "val" / "val_annotations.txt").unlink(), "no val/val_annotations.txt"),
    (lambda b: shutil.rmtree(b / "train" / "n01443537"), "no train/n01443537/"),
    (lambda b: (b / "val" / "images" / "val_4.JPEG").unlink(), "val/images/val_4.JPEG"),
])
def test_tinyimagenet_incomplete_root_is_one_error_naming_the_layout(tmp_path, damage, fragment):
    replicas.tiny_imagenet(tmp_path)
    damage(tmp_path / "tiny-imagenet-200")
    result = runner.invoke(app, ["extract", f"tinyimagenet:{tmp_path}", "--weights", "random"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert "wnids.txt, words.txt, train/<wnid>/images/" in lines[0]


@pytest.mark.parametrize("repeat", ["same", "other-wnid"])
def test_tinyimagenet_val_image_listed_twice_is_refused(tmp_path, repeat):
    """A repeated line counted one image twice in val's denominator (3/7 for 3/6), or under two classes."""
    replicas.tiny_imagenet(tmp_path)
    annotations = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    first = annotations.read_text().splitlines()[0]
    other = first.replace(first.split("\t")[1], "n01443537" if "n01443537" not in first else "n01629819")
    annotations.write_text(annotations.read_text() + (first if repeat == "same" else other) + "\n")
    result = runner.invoke(app, ["extract", f"tinyimagenet:{tmp_path}", "--weights", "random"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {annotations}:10: val_0.JPEG is listed again; each val image needs exactly one line"]


@pytest.mark.parametrize("damage, fragment", [
    (lambda b: (b / "meta" / "test.txt").unlink(), "no meta/test.txt"),
    (lambda b: (b / "images" / "baklava" / sorted((b / "images" / "baklava").iterdir())[0].name).unlink(),
     "of meta/train.txt line 11 is missing"),
])
def test_food101_incomplete_root_is_one_error_naming_the_layout(tmp_path, damage, fragment):
    replicas.food101(tmp_path)
    damage(tmp_path / "food-101")
    result = runner.invoke(app, ["extract", f"food101:{tmp_path}", "--weights", "random"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert "meta/classes.txt" in lines[0]


def test_missing_root_names_the_layout(tmp_path):
    with pytest.raises(SourceError, match="no such folder; expected food-101/"):
        open_source(f"food101:{tmp_path / 'nowhere'}")
    with pytest.raises(SourceError, match="local folder after the colon"):
        open_source("tinyimagenet:")


def test_sources_lists_every_named_layout():
    result = runner.invoke(app, ["sources"])
    assert result.exit_code == 0
    for name in ("tinyimagenet:ROOT", "food101:ROOT", "cifar10:ROOT", "cifar100-coarse:ROOT", "digits",
                 "flowers102:ROOT", "imagenet:ROOT", "stanfordcars:ROOT", "fashionmnist:ROOT"):
        assert name in result.output


def test_cifar_filenames_per_split_index_and_byte_or_str_names(tmp_path):
    for string_names in (False, True):
        folder = tmp_path / str(string_names)
        replicas.cifar10(folder, string_names=string_names)
        source = open_source(f"cifar10:{folder}")
        assert source.classes[:3] == ["airplane", "automobile", "bird"]
        test = [s for s in source.samples if s.split == "test"]
        assert [s.path for s in test] == ["test/img_5_0.png", "test/img_5_1.png", "test/img_5_2.png"]
        assert [s.index for s in test] == [0, 1, 2]
        train = [s for s in source.samples if s.split == "train"]
        assert [s.index for s in train] == list(range(15)) and train[3].path == "train/img_1_0.png"
        image = np.asarray(source.load(test[1]))
        assert image.shape == (32, 32, 3)


def test_cifar100_coarse_labels(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(0)
    import pickle

    for name, n in (("train", 4), ("test", 2)):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": [5, 7, 99, 0][:n],
                 "coarse_labels": [1, 19, 3, 0][:n], "filenames": [f"{name}_{i}.png" for i in range(n)]}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"f{i}" for i in range(100)],
                                              "coarse_label_names": [f"c{i}" for i in range(20)]}))
    fine, coarse = open_source(f"cifar100:{tmp_path}"), open_source(f"cifar100-coarse:{tmp_path}")
    assert len(fine.classes) == 100 and len(coarse.classes) == 20
    assert [coarse.classes[s.label] for s in coarse.samples] == ["c1", "c19", "c3", "c0", "c1", "c19"]
    assert [s.path for s in coarse.samples][:2] == ["train/train_0.png", "train/train_1.png"]
    assert coarse.identity() != fine.identity()
