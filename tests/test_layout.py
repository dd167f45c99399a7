"""Folder trees that look wrong are refused before any work, with one line saying why and
what to use instead; --allow-layout reads them anyway."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from featurecache.cli import app
from featurecache.errors import SourceError
from featurecache.data.sources import open_source

import replicas
from helpers import write_image

runner = CliRunner()


def _folder(root, layout: dict[str, int]):
    seed = 0
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            write_image(root / folder / f"{i}.png", seed := seed + 1, size=16)
    return root


def _refused(source: str, *fragments: str, extra: list[str] = ()) -> None:
    result = runner.invoke(app, ["extract", source, "--weights", "random", *extra])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_tiny_imagenet_folder_suggests_tinyimagenet(tmp_path):
    replicas.tiny_imagenet(tmp_path)
    for given in (tmp_path, tmp_path / "tiny-imagenet-200"):
        _refused(str(given), "Tiny-ImageNet", f"tinyimagenet:{given}", "--allow-layout")
    assert not (tmp_path / "cache").exists()  # refused before anything was written


def test_food101_folder_suggests_food101(tmp_path):
    replicas.food101(tmp_path)
    _refused(str(tmp_path / "food-101"), "Food-101", f"food101:{tmp_path / 'food-101'}")


def test_cifar_batch_folder_suggests_cifar10(tmp_path):
    base = replicas.cifar10(tmp_path)
    _refused(str(base), "CIFAR-10", f"cifar10:{base}")
    _refused(str(tmp_path), f"cifar10:{tmp_path}")


def test_class_folder_named_images_is_refused(tmp_path):
    _folder(tmp_path / "d", {"train/cat": 2, "train/dog": 2, "val/images": 3})
    _refused(str(tmp_path / "d"), "'val/images'", "one level deeper")


def test_empty_class_folder_is_refused(tmp_path):
    _folder(tmp_path / "d", {"cat": 2, "dog": 2, "bird": 0})
    _refused(str(tmp_path / "d"), "1 class folder(s) hold no image (bird)")


def test_classes_only_in_val_or_test_are_refused(tmp_path):
    _folder(tmp_path / "d", {"train/cat": 2, "train/dog": 2, "test/cat": 1, "test/cow": 1})
    _refused(str(tmp_path / "d"), "cow appear in test/ but not in train/")


def test_single_class_is_refused(tmp_path):
    _folder(tmp_path / "d", {"only": 3})
    _refused(str(tmp_path / "d"), "only one class folder ('only')")


def test_images_outside_class_folders_suggest_unlabeled(tmp_path):
    _folder(tmp_path / "d", {"train/cat": 2, "train/dog": 2, "test": 3})
    _refused(str(tmp_path / "d"), "3 image(s) lie in test outside any class folder", "--unlabeled test")


def test_csv_with_one_label_or_unseen_labels_is_refused(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", i, size=16)
    (tmp_path / "one.csv").write_text("path,label\n0.png,a\n1.png,a\n")
    _refused(str(tmp_path / "one.csv"), "same label ('a')")
    (tmp_path / "unseen.csv").write_text("path,label,split\n0.png,a,train\n1.png,b,train\n2.png,c,test\n")
    _refused(str(tmp_path / "unseen.csv"), "label(s) c appear in test but not in train")


def test_allow_layout_reads_it_anyway(tmp_path):
    _folder(tmp_path / "d", {"train/cat": 2, "train/dog": 2, "val/images": 3})
    with pytest.raises(SourceError):
        open_source(str(tmp_path / "d"))
    source = open_source(str(tmp_path / "d"), allow_layout=True)
    assert source.classes == ["cat", "dog", "images"]
    replicas.food101(tmp_path / "f")
    assert open_source(str(tmp_path / "f" / "food-101"), allow_layout=True).classes == ["images", "meta"]


def test_allow_layout_from_the_command_line(tmp_path):
    _folder(tmp_path / "d", {"only": 3})
    result = runner.invoke(app, ["extract", str(tmp_path / "d"), "--weights", "random", "--model", "resnet18",
                                 "--image-size", "32", "--allow-layout", "--root", str(tmp_path / "c"), "-q"])
    assert result.exit_code == 0, result.output
