"""torchvision's named datasets, read by torchvision's own parsers (download=False) from
miniature replicas in each dataset's exact on-disk layout: class names, split sizes, and
each image's official label and split."""

from __future__ import annotations

import os
import shutil

import pytest
import torchvision.datasets as tv
from typer.testing import CliRunner

from featurecache import extract, open_cache
from featurecache.cli import app
from featurecache.errors import SourceError
from featurecache.data.sources import open_source

import replicas
from helpers import stderr_lines

# Replicas cannot match the md5 sums torchvision checks these datasets' real files against.
MD5_CHECKED = {"svhn": tv.SVHN, "stl10": tv.STL10, "flowers102": tv.Flowers102}

CASES = {
    "mnist": (replicas.mnist, None), "fashionmnist": (lambda r: replicas.mnist(r, "FashionMNIST"), None),
    "svhn": (replicas.svhn, None), "stl10": (replicas.stl10, "stl10_binary"),
    "flowers102": (replicas.flowers102, "flowers-102"), "oxfordiiitpet": (replicas.oxford_pet, "oxford-iiit-pet"),
    "dtd": (replicas.dtd, "dtd"), "fgvcaircraft": (replicas.fgvc_aircraft, "fgvc-aircraft-2013b"),
    "eurosat": (replicas.eurosat, "eurosat"), "caltech101": (replicas.caltech101, "caltech101"),
    "sun397": (replicas.sun397, "SUN397"), "stanfordcars": (replicas.stanford_cars, "stanford_cars"),
    "imagenet": (replicas.imagenet, None),
}


@pytest.fixture
def no_md5(monkeypatch):
    for dataset in MD5_CHECKED.values():
        monkeypatch.setattr(dataset, "_check_integrity", lambda self: True)


@pytest.mark.parametrize("prefix", sorted(CASES))
def test_named_torchvision_dataset_official_labels_and_splits(prefix, tmp_path, no_md5):
    build, folder = CASES[prefix]
    truth = build(tmp_path / "root")
    for root in [tmp_path / "root"] + ([tmp_path / "root" / folder] if folder else []):
        # allow_layout: some miniatures (MNIST's 6 images) lack a class in train, which is refused by default
        source = open_source(f"{prefix}:{root}", allow_layout=True)
        assert source.split_counts() == {split: len(items) for split, items in truth.items()}
        for split, expected in truth.items():
            got = [s for s in source.samples if s.split == split]
            if isinstance(expected, dict):  # order is the file system's: compare by file name
                assert {os.path.basename(s.path): source.classes[s.label] for s in got} == expected
                continue
            assert [source.classes[s.label] for s in got] == [name for _, name in expected]
            if expected[0][0] is not None:  # file-backed: each file its own label
                assert [os.path.basename(s.path) for s in got] == [file for file, _ in expected]
        image = source.load(source.samples[0])
        assert image.mode == "RGB"


def test_imagenet_names_and_wnids(tmp_path):
    replicas.imagenet(tmp_path)
    source = open_source(f"imagenet:{tmp_path}")
    assert source.classes == ["tench", "goldfish", "great white shark"]
    assert source.class_ids == ["n01440764", "n01443537", "n01484850"]


def test_named_torchvision_extract_end_to_end(tmp_path, tiny_spec):
    replicas.dtd(tmp_path)
    cache = open_cache(extract(tiny_spec(f"dtd:{tmp_path}")).path)
    assert cache.splits == {"train": 3, "val": 3, "test": 3} and cache.classes == ["banded", "blotchy", "braided"]
    assert cache.manifest["fingerprints"] == "stat"
    assert cache.paths("train")[0] == "dtd/dtd/images/banded/banded_0001.jpg"


@pytest.mark.parametrize("prefix, layout", [("dtd", "dtd/dtd/ holding images/<class>/"),
                                            ("mnist", "MNIST/raw/ holding train-images-idx3-ubyte"),
                                            ("imagenet", "meta.bin")])
def test_missing_torchvision_root_is_one_error_naming_the_layout(tmp_path, prefix, layout):
    result = CliRunner().invoke(app, ["extract", f"{prefix}:{tmp_path}", "--weights", "random"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and layout in lines[0], result.output


def _rows(source, split):
    return [(os.path.basename(s.path), source.classes[s.label]) for s in source.samples if s.split == split]


def test_dtd_split_whose_label_file_lacks_a_class_keeps_each_image_its_class(tmp_path):
    truth = replicas.dtd(tmp_path)
    listing = tmp_path / "dtd" / "dtd" / "labels" / "test1.txt"  # torchvision numbers test's classes by this file
    listing.write_text("".join(line for line in listing.read_text().splitlines(True) if not line.startswith("banded")))
    source = open_source(f"dtd:{tmp_path}")
    assert source.classes == ["banded", "blotchy", "braided"]
    assert _rows(source, "train") == truth["train"] and _rows(source, "val") == truth["val"]
    assert _rows(source, "test") == truth["test"][1:] == [("blotchy_0008.jpg", "blotchy"),
                                                          ("braided_0009.jpg", "braided")]


def test_imagenet_val_lacking_a_wnid_keeps_each_image_its_class(tmp_path):
    import shutil

    truth = replicas.imagenet(tmp_path)
    shutil.rmtree(tmp_path / "val" / "n01440764")  # val's folders then number goldfish 0
    source = open_source(f"imagenet:{tmp_path}")
    assert source.classes == ["tench", "goldfish", "great white shark"]
    assert source.class_ids == ["n01440764", "n01443537", "n01484850"]
    assert _rows(source, "train") == truth["train"]
    assert _rows(source, "val") == truth["val"][2:] == [("ILSVRC2012_val_00000011.JPEG", "goldfish"),
                                                         ("ILSVRC2012_val_00000012.JPEG", "goldfish"),
                                                         ("ILSVRC2012_val_00000021.JPEG", "great white shark"),
                                                         ("ILSVRC2012_val_00000022.JPEG", "great white shark")]


def test_oxford_pet_split_lacking_a_breed_keeps_each_image_its_breed(tmp_path):
    truth = replicas.oxford_pet(tmp_path)
    listing = tmp_path / "oxford-iiit-pet" / "annotations" / "trainval.txt"
    listing.write_text("".join(line for line in listing.read_text().splitlines(True)
                               if not line.startswith("american_bulldog")))
    source = open_source(f"oxfordiiitpet:{tmp_path}", allow_layout=True)  # a breed only in test is refused by default
    assert source.classes == ["Abyssinian", "American Bulldog", "American Pit Bull Terrier"]
    assert _rows(source, "train") == [row for row in truth["train"] if row[1] != "American Bulldog"]
    assert _rows(source, "test") == truth["test"]


def test_a_hidden_folder_is_not_a_class(tmp_path):
    """torchvision's EuroSAT lists every folder: a notebook's .ipynb_checkpoints became a fourth class."""
    replicas.eurosat(tmp_path)
    hidden = tmp_path / "eurosat" / "2750" / ".ipynb_checkpoints"
    replicas._jpeg(hidden / "Forest_1-checkpoint.jpg", 1, 99, size=64)
    result = CliRunner().invoke(app, ["extract", f"eurosat:{tmp_path}", "--weights", "random"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: eurosat: class '.ipynb_checkpoints' is a hidden folder (a notebook's or "
                                     "the system's), not a class; remove it from the dataset's folder")
    hidden.joinpath("Forest_1-checkpoint.jpg").unlink()
    hidden.rmdir()
    assert open_source(f"eurosat:{tmp_path}").classes == ["AnnualCrop", "Forest", "HerbaceousVegetation"]


def test_caltech101_lists_the_images_each_category_holds(tmp_path):
    """torchvision's Caltech101 counts a category folder's entries and assumes image_0001..N.jpg: a
    .DS_Store became a phantom image_0004.jpg, skipped as missing, and a gap in the numbers left the
    last image unread. Hidden entries and non-image files are ignored now, as ImageFolder does."""
    replicas.caltech101(tmp_path)
    base = tmp_path / "caltech101" / "101_ObjectCategories"
    (base / "Faces" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (base / "Faces" / "Thumbs.db").write_bytes(b"\xd0\xcf")
    (base / "airplanes" / "._image_0001.jpg").write_bytes(b"\0\5\26\7")  # macOS's AppleDouble twin
    (base / "accordion" / "image_0001.jpg").unlink()  # accordion holds image_0002.jpg only
    expected = [("image_0001.jpg", "Faces"), ("image_0002.jpg", "Faces"), ("image_0003.jpg", "Faces"),
                ("image_0002.jpg", "accordion"), ("image_0001.jpg", "airplanes"), ("image_0002.jpg", "airplanes")]
    source = open_source(f"caltech101:{tmp_path / 'caltech101'}")
    assert source.classes == ["Faces", "accordion", "airplanes"] and _rows(source, "train") == expected
    assert not (tmp_path / "caltech101" / "caltech101").exists()  # torchvision made this folder in the user's data
    replicas._jpeg(base / ".ipynb_checkpoints" / "image_0001-checkpoint.jpg", 1, 99)  # a hidden folder: no class
    result = CliRunner().invoke(app, ["extract", f"caltech101:{tmp_path}", "--weights", "random", "--model",
                                      "resnet18", "--image-size", "32", "--workers", "0"])
    assert result.exit_code == 0 and "rows: train 6; skipped: 0" in result.stdout, result.output


@pytest.mark.parametrize("stray, message", [
    (".DS_Store", "101_ObjectCategories/.DS_Store is a file among the category folders, which torchvision's "
                  "Caltech101 reads as a category; remove it"),
    ("Faces/extra.png", "101_ObjectCategories/Faces/extra.png is not an image_NNNN.jpg file, the only kind "
                        "torchvision's Caltech101 reads; rename it, or move it out of the dataset"),
])
def test_caltech101_refuses_what_it_cannot_read(tmp_path, stray, message):
    """A file among the category folders was a traceback inside torchvision ('not a complete root'); an
    image of another name was never read."""
    replicas.caltech101(tmp_path)
    replicas._jpeg(tmp_path / "caltech101" / "101_ObjectCategories" / stray, 1, 99)
    result = CliRunner().invoke(app, ["extract", f"caltech101:{tmp_path}", "--weights", "random"])
    assert result.exit_code == 2
    assert stderr_lines(result) == [f"error: caltech101:{tmp_path / 'caltech101'}: {message}"]


def test_named_sources_get_the_class_checks_unless_allow_layout(tmp_path):
    """A named dataset's classes were never checked (open_named took no --allow-layout): a DTD whose
    train list lacks a class extracted with exit 0, that class never learnt but scored in val and test."""
    replicas.dtd(tmp_path)
    listing = tmp_path / "dtd" / "dtd" / "labels" / "train1.txt"
    listing.write_text("".join(line for line in listing.read_text().splitlines(True) if not line.startswith("banded")))
    refused = CliRunner().invoke(app, ["extract", f"dtd:{tmp_path}", "--weights", "random"])
    assert refused.exit_code == 2
    assert stderr_lines(refused) == [f"error: dtd:{tmp_path}: class(s) banded appear in val but not in train, so no "
                                     "head can learn them, or pass --allow-layout if this really is the layout you mean"]
    allowed = CliRunner().invoke(app, ["extract", f"dtd:{tmp_path}", "--weights", "random", "--allow-layout",
                                       "--model", "resnet18", "--image-size", "32", "--workers", "0"])
    assert allowed.exit_code == 0 and "rows: train 2, val 3, test 3; skipped: 0" in allowed.stdout, allowed.output
    replicas.caltech101(tmp_path / "one")
    for category in ("accordion", "airplanes"):  # Faces alone (BACKGROUND_Google is not a class)
        shutil.rmtree(tmp_path / "one" / "caltech101" / "101_ObjectCategories" / category)
    with pytest.raises(SourceError, match=r"every row has the same class \('Faces'\); a classifier needs two"):
        open_source(f"caltech101:{tmp_path / 'one'}")
    assert open_source(f"caltech101:{tmp_path / 'one'}", allow_layout=True).classes == ["Faces"]


def test_content_hash_reaches_torchvision_parsed_datasets(tmp_path):
    """dtd: with --content-hash fingerprinted its files by size and mtime; the manifest said "content"."""
    replicas.dtd(tmp_path)
    by_stat = open_source(f"dtd:{tmp_path}", allow_layout=True)
    by_content = open_source(f"dtd:{tmp_path}", content_hash=True, allow_layout=True)
    assert (by_stat.fingerprint_kind, by_content.fingerprint_kind) == ("stat", "content")
    first = tmp_path / "dtd" / "dtd" / by_content.samples[0].path.split("dtd/dtd/", 1)[1]
    before = first.stat()
    data = bytearray(first.read_bytes())
    data[-3] ^= 0xFF  # new bytes behind the same size and mtime
    first.write_bytes(bytes(data))
    os.utime(first, ns=(before.st_atime_ns, before.st_mtime_ns))
    again = open_source(f"dtd:{tmp_path}", content_hash=True, allow_layout=True)
    assert [a.fingerprint == b.fingerprint for a, b in zip(by_content.samples, again.samples)] == \
        [i != 0 for i in range(len(again.samples))]


def test_draft_is_recorded_only_where_it_decodes(tmp_path, tiny_spec, caplog):
    """dtd: --draft decoded at full size (a dataset object, not files) yet the key said jpeg_draft."""
    import logging

    replicas.dtd(tmp_path)
    with caplog.at_level(logging.WARNING, "featurecache"):
        drafted = open_cache(extract(tiny_spec(f"dtd:{tmp_path}", draft=True, allow_layout=True)).path)
    assert "jpeg_draft" not in drafted.manifest["config"]["preprocessing"]
    assert any(m.startswith("--draft applies to image files") for m in caplog.messages), caplog.messages
    plain = extract(tiny_spec(f"dtd:{tmp_path}", allow_layout=True))
    assert plain.cache_hit and plain.path == drafted.path  # the same features: the same entry
