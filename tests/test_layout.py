"""Folder trees that look wrong are refused before any work, with one line saying why and
what to use instead; --allow-layout reads them anyway."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from featurecache.cli import app
from featurecache.errors import SourceError
from featurecache.data.sources import open_source

import replicas
from helpers import stderr_lines, write_image

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


def _csv(tmp_path, name: str, rows: str) -> str:
    for i in range(4):
        if not (tmp_path / f"a{i}.png").exists():
            write_image(tmp_path / f"a{i}.png", i, size=16)
    (tmp_path / name).write_text("path,label,split\n" + rows)
    return str(tmp_path / name)


@pytest.mark.parametrize("rows, fragment", [
    ("a0.png,x,train\na1.png,y,train\na0.png,y,test\n", "csv:4: a0.png is listed again (first on line 2)"),
    ("a0.png,x,train\n./a0.png,y,train\na1.png,y,train\n", "csv:3: ./a0.png is listed again (first on line 2)"),
    ("a0.png,x,train\na1.png,y,train\nsub/../a1.png,y,val\n", "csv:4: sub/../a1.png is listed again"),
])
def test_csv_listing_a_file_twice_is_refused(tmp_path, rows, fragment):
    """Two labels for one image, or one image in train and test: accepted silently before."""
    _refused(_csv(tmp_path, "dup.csv", rows), fragment, "list each image once", extra=["--allow-layout"])


@pytest.mark.parametrize("labels, twins, allowed", [
    (("1", "1.0", "2"), "'1' and '1.0'", ["1", "1.0", "2"]),
    (("2", "02", "3"), "'02' and '2'", ["02", "2", "3"]),
    (("Dog", "dog", "cat"), "'Dog' and 'dog'", ["Dog", "cat", "dog"]),
])
def test_labels_spelt_two_ways_are_refused(tmp_path, labels, twins, allowed):
    """`1` and `1.0`, or `Dog` and `dog`, silently became two classes splitting one class's images."""
    rows = "".join(f"a{i}.png,{label},train\n" for i, label in enumerate(labels))
    _refused(_csv(tmp_path, "twins.csv", rows), f"labels {twins} differ only in case, number format")
    assert open_source(str(tmp_path / "twins.csv"), allow_layout=True).classes == allowed
    assert open_source(_csv(tmp_path, "fine.csv", "a0.png,1,train\na1.png,10,train\na2.png,2,train\n")).classes == \
        ["1", "2", "10"]


def test_class_folders_spelt_two_ways_are_refused(tmp_path):
    _folder(tmp_path / "d", {"train/Dog": 1, "train/dog": 1, "train/cat": 1})
    _refused(str(tmp_path / "d"), "class folders 'Dog' and 'dog' differ only in case")
    _folder(tmp_path / "u", {"caf\u00e9": 1, "cafe\u0301": 1, "cat": 1})  # NFC beside NFD (a macOS zip)
    _refused(str(tmp_path / "u"), "Unicode form")
    rows = "a0.png,cat,train\na1.png,\"cat \",train\na2.png,dog,train\n"
    assert open_source(_csv(tmp_path, "spaces.csv", rows)).classes == ["cat", "dog"]  # the CSV reader strips


def test_csv_labelled_rows_in_an_unknown_split_are_refused(tmp_path):
    """A misspelt split became a split of its own that nothing ever scored."""
    source = _csv(tmp_path, "split.csv", "a0.png,x,train\na1.png,y,train\na2.png,x,tset\n")
    _refused(source, "split.csv:4: split 'tset' is not train, val or test", "never be scored")
    assert open_source(source, allow_layout=True).split_counts() == {"train": 2, "tset": 1}
    _refused(_csv(tmp_path, "blank.csv", "a0.png,x,train\na1.png,y,train\na2.png,x,\n"),
             "blank.csv:4: the split cell is empty; with a split column, every row names its split")
    aliases = open_source(_csv(tmp_path, "aliases.csv", "a0.png,x,Training\na1.png,y,train\na2.png,x,VALID\n"
                                                          "a3.png,y,testing\n"))
    assert aliases.split_counts() == {"train": 2, "val": 1, "test": 1}
    unlabelled = open_source(_csv(tmp_path, "pool.csv", "a0.png,x,train\na1.png,y,train\na2.png,,pool\n"))
    assert unlabelled.split_counts() == {"train": 2, "pool": 1} and unlabelled.unlabeled_splits == ["pool"]


def test_a_class_whose_train_images_were_all_skipped_is_warned_about(tmp_path):
    """The 'only in val/test' refusal runs before extraction; a class whose every train image
    is unreadable got past it and was scored as errors with no word said."""
    root = _folder(tmp_path / "d", {"train/cat": 2, "train/dog": 2, "train/cow": 0, "test/cat": 1, "test/dog": 1,
                                    "test/cow": 2})
    for i in range(2):
        (root / "train" / "cow" / f"{i}.png").write_text("not an image")
    cache_root = tmp_path / "cache"
    result = runner.invoke(app, ["extract", str(root), "--weights", "random", "--model", "resnet18", "--image-size",
                                 "32", "--workers", "0", "--root", str(cache_root)])
    assert result.exit_code == 0, result.output
    warning = ("warning: 1 class(es) have no train row ('cow'): no head can learn them, yet 2 test row(s) of theirs "
               "are scored as errors")
    assert [line for line in result.stderr.splitlines() if line.startswith("warning:")] == [
        warning + "; check the skipped files (featurecache info) and the labels"]
    entry = next(p for p in cache_root.iterdir() if p.name != "_weights")
    fitted = runner.invoke(app, ["fit-head", str(entry), "--head", "knn"])
    assert fitted.exit_code == 0, fitted.output
    assert warning in fitted.stderr
    from featurecache.fit.headstore import read_record
    from featurecache import open_cache

    record = read_record(open_cache(entry), "knn")
    assert any("no train row ('cow')" in note for note in record["notes"])
    assert record["metrics"]["test"]["top1"] <= 2 / 4  # the two cow rows cannot be right
    again = runner.invoke(app, ["extract", str(root), "--weights", "random", "--model", "resnet18", "--image-size",
                                "32", "--workers", "0", "--root", str(cache_root)])
    assert "cache hit" in again.stdout and warning in again.stderr  # said again on a hit


def test_two_folders_naming_one_split_are_refused(tmp_path):
    """val/ and validation/: the last one listed won, and the other's images vanished (exit 0)."""
    _folder(tmp_path / "d", {"train/cat": 1, "train/dog": 1, "val/cat": 1, "val/dog": 1, "validation/cat": 1,
                             "validation/dog": 1})
    _refused(str(tmp_path / "d"), "folders val/ and validation/ both name the val split")
    with pytest.raises(SourceError, match="both name the val split"):
        open_source(str(tmp_path / "d"), allow_layout=True)


@pytest.mark.parametrize("layout, fragment", [
    ({"train/cat": 1, "train/dog": 1, "val/cat": 1, "val/dog": 1, "holdout/cat": 2, "holdout/dog": 1},
     "folder(s) holdout sit beside the split folder(s) train/, val/ but are not train, val or test, so their 3 image"),
    ({"bus": 1, "car": 1, "train": 1}, "folder(s) bus, car sit beside the split folder(s) train/"),
    ({"train/cat": 1, "train/dog": 1, "test/cat": 1, "test/dog": 1, ".": 2}, "2 image(s) lie beside the split"),
])
def test_images_beside_the_split_folders_are_not_dropped_silently(tmp_path, layout, fragment):
    """A holdout/ folder, a flat layout with a class named train, loose images at the top: unread, no word said."""
    _refused(str(_folder(tmp_path / "d", layout)), fragment)
    _folder(tmp_path / "fine", {"train/cat": 1, "train/dog": 1, "meta": 0})  # a folder without images is no loss
    assert open_source(str(tmp_path / "fine")).split_counts() == {"train": 2}


def test_a_label_beyond_the_class_names_is_an_error_not_a_traceback(tmp_path):
    from featurecache.data.sources import ArraySource

    images = np.zeros((3, 8, 8, 3), np.uint8)
    with pytest.raises(SourceError, match=r"t/train/000002 has label 2, but 2 class names are given"):
        ArraySource("t", "t", ["a", "b"], images, np.array([0, 1, 2]), ["train"] * 3)


def test_class_folders_holding_only_subfolders_are_refused(tmp_path):
    """SUN397's a/abbey/*.jpg read as an image folder gave the classes a and b, exit 0."""
    _folder(tmp_path / "SUN397", {"a/abbey": 2, "a/airport": 2, "b/badlands": 2})
    _refused(str(tmp_path / "SUN397"), "no class folder holds an image directly (a, b hold only subfolders)")
    (tmp_path / "SUN397" / "ClassName.txt").write_text("/a/abbey\n/a/airport\n/b/badlands\n")
    for given in (tmp_path, tmp_path / "SUN397"):
        _refused(str(given), "SUN397's layout", f"sun397:{tmp_path}")
    _folder(tmp_path / "nested", {"cat/day1": 1, "cat": 1, "dog/day1": 2})  # one class holding images: read
    assert open_source(str(tmp_path / "nested")).classes == ["cat", "dog"]


def test_one_file_reached_twice_is_refused(tmp_path):
    """A test image linked to a train image (a leak scored as accuracy), a symlinked class folder
    (two classes of identical images), a hard link in a CSV: each listed silently."""
    import os

    root = _folder(tmp_path / "d", {"train/cat": 2, "train/dog": 2, "test/cat": 1, "test/dog": 1})
    os.symlink(root / "train" / "cat" / "1.png", root / "test" / "dog" / "leak.png")
    _refused(str(root), "train/cat/1.png and test/dog/leak.png are the same file")
    flat = _folder(tmp_path / "flat", {"cat": 2, "dog": 2})
    os.symlink("cat", flat / "cat2")
    _refused(str(flat), "cat/0.png and cat2/0.png are the same file")
    assert open_source(str(flat), allow_layout=True).classes == ["cat", "cat2", "dog"]
    rows = "a0.png,x,train\na1.png,y,train\nhard.png,x,test\n"
    _csv(tmp_path, "list.csv", "")
    os.link(tmp_path / "a0.png", tmp_path / "hard.png")
    (tmp_path / "list.csv").write_text("path,label,split\n" + rows)
    _refused(str(tmp_path / "list.csv"), "a0.png and hard.png are the same file")


def test_unlabeled_on_a_split_of_class_folders_is_refused(tmp_path):
    """--unlabeled val on a val/ of class folders dropped its labels without a word."""
    root = _folder(tmp_path / "d", {"train/cat": 2, "train/dog": 2, "val/cat": 1, "val/dog": 1})
    _refused(str(root), "val/ holds 2 folders of images (cat, dog), which look like class folders; "
                        "--unlabeled val would drop their labels", extra=["--unlabeled", "val"])
    assert open_source(str(root), unlabeled=("val",), allow_layout=True).unlabeled_splits == ["val"]
    _folder(tmp_path / "t", {"train/cat": 2, "train/dog": 2, "test/images": 2})  # one container folder: fine
    assert open_source(str(tmp_path / "t"), unlabeled=("test",)).split_counts() == {"train": 4, "test": 2}


def _extract(root, *extra: str):
    return runner.invoke(app, ["extract", str(root), "--weights", "random", *extra])


def _extract_warnings(root, log, *extra: str) -> list[str]:
    """`extract` in its own process (logging is configured once per process, so the library's
    warnings print there as they do for a user), tiny backbone; its warning lines."""
    from processes import run_cli

    argv = ["extract", str(root), "--model", "tiny", "--weights", "random", "--image-size", "32", "--workers", "0",
            "-q", "--root", str(log.parent / "cache"), *extra]
    assert run_cli(argv, log) == 0, log.read_text()
    return [line for line in log.read_text().splitlines() if line.startswith(("warning:", "error:"))]


def test_symlinked_folders_inside_a_class_are_followed_but_never_back_up(tmp_path):
    """cat/more -> /elsewhere/cats was not followed: its images vanished without a word (ImageFolder
    reads them). A link back up to a folder above (train/dog/up -> ..) would loop, or read the other
    classes as dog: not followed, with a warning."""
    import os

    root = _folder(tmp_path / "d", {"train/cat": 1, "train/dog": 2, "test/cat": 1, "test/dog": 1})
    for i in range(2):  # seeds of their own: a byte-identical copy of a dog would be warned about
        write_image(tmp_path / "elsewhere" / "cats" / f"{i}.png", 100 + i, size=16)
    os.symlink(tmp_path / "elsewhere" / "cats", root / "train" / "cat" / "more")
    os.symlink("..", root / "train" / "dog" / "up")
    assert _extract_warnings(root, tmp_path / "extract.log") == [
        f"warning: {root}/train/dog/up links back to a folder above it (a loop); it is not followed"]
    source = open_source(str(root))
    assert [(s.path, source.classes[s.label]) for s in source.samples if s.split == "train"] == [
        ("train/cat/0.png", "cat"), ("train/cat/more/0.png", "cat"), ("train/cat/more/1.png", "cat"),
        ("train/dog/0.png", "dog"), ("train/dog/1.png", "dog")]
    os.symlink(root / "train" / "dog", root / "train" / "cat" / "dogs")  # dog's images under cat too: refused
    _refused(str(root), "train/cat/dogs/0.png and train/dog/0.png are the same file")


def test_an_empty_split_folder_is_refused(tmp_path):
    """A test/ left empty (a copy that stopped short) was dropped without a word: the cache had no test
    split, and heads were scored on val as if nothing were missing."""
    root = _folder(tmp_path / "d", {"train/cat": 2, "train/dog": 2, "val/cat": 1, "val/dog": 1, "test": 0})
    refusal = (f"error: {root}: the split folder(s) test/ hold no image, so the cache would have no such split and "
               "heads would be scored without it; put its images there (a copy that stopped short?), remove the "
               "empty folder, or pass --allow-layout if this really is the layout you mean")
    for extra in ([], ["--unlabeled", "test"]):
        result = _extract(root, *extra)
        assert result.exit_code == 2 and stderr_lines(result) == [refusal], result.output
    _folder(root, {"test/cat": 0, "test/dog": 0})  # class folders, none holding an image: the same refusal
    result = _extract(root)
    assert result.exit_code == 2 and stderr_lines(result) == [refusal], result.output
    assert not (tmp_path / "cache").exists()  # refused before anything was written
    assert _extract_warnings(root, tmp_path / "allowed.log", "--allow-layout") == [
        f"warning: {root}: no image found in test/; the cache has no such split"]
    assert open_source(str(root), allow_layout=True).split_counts() == {"train": 4, "val": 2}


def test_an_empty_class_folder_of_one_split_says_which_and_what_to_do(tmp_path):
    """test/dog/ empty while train/dog/ has images was refused as 'a class nothing is labelled with',
    which dog is not: the message now says test would score no dog, and what to do."""
    root = _folder(tmp_path / "d", {"train/cat": 2, "train/dog": 2, "test/cat": 1, "test/dog": 0})
    result = _extract(root)
    assert result.exit_code == 2
    assert stderr_lines(result) == [
        f"error: {root}: the class folder test/dog/ holds no image, though dog has images in train/, so test would "
        "score no dog; put its test images there (a copy that stopped short?), remove the empty folder, or pass "
        "--allow-layout if this really is the layout you mean"]
    source = open_source(str(root), allow_layout=True)
    assert source.classes == ["cat", "dog"] and source.split_counts() == {"train": 4, "test": 1}
