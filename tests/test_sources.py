"""Every source kind: ImageFolder (with and without splits), CSV, CIFAR-10/100, digits."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from featurecache import extract, open_cache
from featurecache.errors import SourceError
from featurecache.data.sources import open_source

from helpers import write_image


def test_image_folder_with_splits(image_folder):
    source = open_source(str(image_folder))
    assert source.classes == ["ants", "bees"]
    assert source.split_counts() == {"train": 10, "val": 6}


def test_image_folder_without_splits(tmp_path):
    for label in ("cat", "dog"):
        for i in range(2):
            write_image(tmp_path / "pets" / label / f"{i}.jpg", i)
    (tmp_path / "pets" / "cat" / "notes.txt").write_text("ignored: not an image extension")
    source = open_source(str(tmp_path / "pets"))
    assert source.split_counts() == {"train": 4}
    assert [s.label for s in source.samples] == [0, 0, 1, 1]


def test_csv_source(tmp_path, tiny_spec):
    for i in range(4):
        write_image(tmp_path / "imgs" / f"{i}.png", i)
    (tmp_path / "list.csv").write_text(
        "path,label,split\nimgs/0.png,cat,train\nimgs/1.png,dog,train\nimgs/2.png,cat,val\nimgs/3.png,dog,test\n")
    source = open_source(str(tmp_path / "list.csv"))
    assert source.classes == ["cat", "dog"] and source.split_counts() == {"train": 2, "val": 1, "test": 1}
    cache = open_cache(extract(tiny_spec(tmp_path / "list.csv")).path)
    assert cache.splits == {"train": 2, "val": 1, "test": 1}
    assert cache.paths("test") == ["imgs/3.png"]


def test_csv_errors_name_the_line(tmp_path):
    (tmp_path / "bad.csv").write_text("path,label\na.png,\n")
    with pytest.raises(SourceError, match=r"bad.csv:2"):
        open_source(str(tmp_path / "bad.csv"))
    (tmp_path / "nohdr.csv").write_text("a.png,cat\n")
    with pytest.raises(SourceError, match="header"):
        open_source(str(tmp_path / "nohdr.csv"))


def _write_cifar(root, variant):
    rng = np.random.default_rng(0)
    if variant == "cifar10":
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True)
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 3]}
            (base / name).write_bytes(pickle.dumps(batch))
        (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}" for i in range(10)]}))
    else:
        base = root / "cifar-100-python"
        base.mkdir(parents=True)
        for name in ("train", "test"):
            batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"fine_labels": [5, 7, 99]}
            (base / name).write_bytes(pickle.dumps(batch))
        (base / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"f{i}" for i in range(100)]}))


@pytest.mark.parametrize("variant, counts", [("cifar10", {"train": 10, "test": 2}), ("cifar100", {"train": 3, "test": 3})])
def test_cifar_from_local_root(tmp_path, variant, counts, tiny_spec):
    _write_cifar(tmp_path, variant)
    source = open_source(f"{variant}:{tmp_path}")
    assert source.split_counts() == counts
    image = source.load(source.samples[0])
    assert image.mode == "RGB" and image.size == (32, 32)
    cache = open_cache(extract(tiny_spec(f"{variant}:{tmp_path}")).path)
    assert cache.splits == counts


def test_cifar_missing_says_where(tmp_path):
    with pytest.raises(SourceError, match="cifar-10-batches-py"):
        open_source(f"cifar10:{tmp_path}")


def test_cifar_pickle_with_code_is_refused(tmp_path):
    _write_cifar(tmp_path, "cifar10")

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(SourceError, match="refused"):
        open_source(f"cifar10:{tmp_path}")


def test_digits_fixed_splits():
    source = open_source("digits")
    assert source.split_counts() == {"train": 1078, "val": 359, "test": 360}
    assert open_source("digits").samples == source.samples  # seeded: identical every time
    image = source.load(source.samples[0])
    assert image.size == (8, 8) and image.mode == "RGB"
    assert np.asarray(image).max() == 255  # 0..16 scaled to 0..255


def test_jpegs_by_their_other_names_are_extracted(tmp_path, tiny_spec):
    """A .jfif (what browsers save JPEGs as) or .jpe was not listed: the image vanished without a word."""
    for i, name in enumerate(("cat/0.jpg", "cat/1.jfif", "dog/0.jpg", "dog/1.JPE", "dog/2.jif", "dog/3.pnm")):
        write_image(tmp_path / "pets" / name, i, fmt="PPM" if name.endswith(".pnm") else "JPEG")
    cache = open_cache(extract(tiny_spec(tmp_path / "pets")).path)
    assert cache.paths("train") == ["cat/0.jpg", "cat/1.jfif", "dog/0.jpg", "dog/1.JPE", "dog/2.jif", "dog/3.pnm"]
    assert cache.labels("train").tolist() == [0, 0, 1, 1, 1, 1] and cache.manifest["skipped"] == []


def test_images_in_formats_not_read_are_said_not_dropped_silently(tmp_path, caplog):
    """A phone's .heic photos beside its JPEGs vanished from the class without a word."""
    import logging

    from featurecache.serve.predict import image_files

    for split in ("train", "test"):
        for label in ("cat", "dog"):
            write_image(tmp_path / "d" / split / label / "0.png", seed=len(label) + len(split))
    (tmp_path / "d" / "train" / "cat" / "IMG_1.heic").write_bytes(b"not read")
    (tmp_path / "d" / "train" / "cat" / "IMG_2.HEIC").write_bytes(b"not read")
    (tmp_path / "d" / "test" / "dog" / "x.avif").write_bytes(b"not read")
    (tmp_path / "d" / "train" / "dog" / "notes.txt").write_text("not an image: no word")
    with caplog.at_level(logging.WARNING, "featurecache"):
        source = open_source(str(tmp_path / "d"))
    assert len(source.samples) == 4
    assert caplog.messages == [
        f"3 image file(s) under {tmp_path / 'd'} are in formats featurecache does not read (1 .avif, 2 .heic; "
        "e.g. test/dog/x.avif) and are left out; convert them to JPEG or PNG to include them"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, "featurecache"):
        assert len(image_files([tmp_path / "d" / "train"])) == 2  # predict FOLDER says so too
    assert caplog.messages == [f"2 image file(s) under {tmp_path / 'd' / 'train'} are in formats featurecache does "
                               "not read (2 .heic; e.g. cat/IMG_1.heic) and are left out; convert them to JPEG or PNG "
                               "to include them"]
