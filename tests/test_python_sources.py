"""featurecache.extract(source=...) from Python objects: torchvision datasets, (path, label)
lists and uint8 arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from typer.testing import CliRunner

import featurecache
from featurecache import FitSpec, fit_head, open_cache
from featurecache.cli import app
from featurecache.data.python_objects import from_python
from featurecache.errors import SourceError
from featurecache.serve.predict import predict_split

import replicas

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SETTINGS = dict(model="resnet18", weights="random", image_size=32, precision="fp32", dtype="float32",
                batch_size=8, workers=0, shard_size=16)


def _colour_arrays(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    colours = np.array(replicas.COLOURS[:3], dtype=np.int16)
    images = np.clip(colours[labels][:, None, None, :] + rng.integers(-30, 31, (count, 24, 24, 3)), 0, 255)
    return images.astype(np.uint8), labels


def test_torchvision_image_folder_object(tmp_path):
    seed = 0
    for split, count in (("train", 4), ("val", 2)):
        for label, name in enumerate(("red", "green", "blue")):
            for i in range(count):
                replicas.class_image(tmp_path / split / name / f"{i}.png", label, seed := seed + 1, size=24)
    parts = {split: torchvision.datasets.ImageFolder(str(tmp_path / split), transform=torchvision.transforms.ToTensor())
             for split in ("train", "val")}
    result = featurecache.extract(source=parts, name="colours", root=str(tmp_path / "cache"), **SETTINGS)
    cache = open_cache(result.path)
    assert result.path.name.startswith("colours-") and cache.splits == {"train": 12, "val": 6}
    assert cache.classes == ["blue", "green", "red"]
    assert cache.paths("val")[0] == "val/blue/0.png"  # files: fingerprinted by stat
    assert cache.manifest["fingerprints"] == "stat"
    assert list(cache.labels("train")) == [0] * 4 + [1] * 4 + [2] * 4
    assert fit_head(cache, FitSpec(head="logistic")).record["metrics"]["val"]["top1"] >= 0.8
    again = featurecache.extract(source=parts, name="colours", root=str(tmp_path / "cache"), **SETTINGS)
    assert again.cache_hit


def test_torchvision_dataset_without_files_uses_content_fingerprints(tmp_path):
    fake = torchvision.datasets.FakeData(size=10, image_size=(3, 20, 20), num_classes=3, random_offset=5)
    result = featurecache.extract(source=fake, root=str(tmp_path / "cache"), **SETTINGS)
    cache = open_cache(result.path)
    assert cache.splits == {"train": 10} and cache.manifest["fingerprints"] == "content"
    assert list(cache.labels("train")) == [int(fake[i][1]) for i in range(10)]
    info = CliRunner().invoke(app, ["info", str(result.path)])
    assert "content (no files to stat" in info.output
    assert featurecache.extract(source=fake, root=str(tmp_path / "cache"), **SETTINGS).cache_hit


def test_list_of_path_label_pairs(tmp_path):
    pairs = []
    for i in range(9):
        path = replicas.class_image(tmp_path / "imgs" / f"{i}.png", i % 3, i, size=24)
        pairs.append((str(path), ["cat", "dog", "eel"][i % 3], "test" if i >= 6 else "train"))
    pairs.append((str(replicas.class_image(tmp_path / "imgs" / "x.png", 0, 99, size=24)), None, "val"))
    cache = open_cache(featurecache.extract(source=pairs, root=str(tmp_path / "cache"), **SETTINGS).path)
    assert cache.splits == {"train": 6, "val": 1, "test": 3} and cache.classes == ["cat", "dog", "eel"]
    assert cache.unlabeled_splits == ["val"] and cache.paths("test") == ["6.png", "7.png", "8.png"]
    assert list(cache.labels("test")) == [0, 1, 2]


def test_uint8_arrays_with_an_unlabeled_split_predict_from_the_cache(tmp_path):
    train, test = _colour_arrays(18, 0), _colour_arrays(6, 1)
    source = {"train": train, "val": _colour_arrays(9, 2), "test": test[0], "classes": ["red", "green", "blue"]}
    result = featurecache.extract(source=source, name="arr", root=str(tmp_path / "cache"), **SETTINGS)
    cache = open_cache(result.path)
    assert cache.splits == {"train": 18, "val": 9, "test": 6} and cache.unlabeled_splits == ["test"]
    assert cache.classes == ["red", "green", "blue"]
    arrays = cache.arrays("test")
    assert arrays["features"].shape == (6, 512) and list(arrays["labels"]) == [-1] * 6
    assert list(arrays["index"]) == list(range(6))
    fit_head(cache, FitSpec(head="logistic"))
    predicted = [p.top[0][0] for p in predict_split(cache, "logistic", "test")]
    assert predicted == [["red", "green", "blue"][label] for label in test[1]]
    simple = featurecache.extract(source=train, root=str(tmp_path / "cache"), **SETTINGS)
    assert open_cache(simple.path).splits == {"train": 18}


@pytest.mark.parametrize("bad, fragment", [
    (object(), "cannot read a dataset from a object"),
    ((np.zeros((2, 4, 4), dtype=np.float32), np.zeros(2)), "uint8"),
    ((np.zeros((2, 4, 4), dtype=np.uint8), np.zeros(3)), "2 images but 3 labels"),
    ([("a.png", None)], "has no label"),
])
def test_bad_python_sources_say_what_is_accepted(tmp_path, bad, fragment):
    with pytest.raises(SourceError, match=fragment):
        featurecache.extract(source=bad, root=str(tmp_path / "cache"), **SETTINGS)


def test_a_python_cache_cannot_be_reopened_from_its_manifest(tmp_path):
    cache = open_cache(featurecache.extract(source=_colour_arrays(6, 0), root=str(tmp_path / "c"), **SETTINGS).path)
    from featurecache.data.sources import reopen_source

    with pytest.raises(SourceError, match="extracted from a Python object"):
        reopen_source(cache.manifest["spec"])


def _folders(root, layout: dict[str, list[str]]):
    """root/<split>/<class>/<class>_<i>.png, two images per class, a colour per class."""
    colours = {"cat": 0, "dog": 1, "fox": 2, "owl": 3}
    for split, names in layout.items():
        for name in names:
            for i in range(2):
                replicas.class_image(root / split / name / f"{name}_{i}.png", colours[name], colours[name] * 10 + i,
                                     size=24)
    return {split: torchvision.datasets.ImageFolder(str(root / split)) for split in layout}


def _rows(cache, split):
    return list(zip(cache.paths(split), [cache.classes[label] for label in cache.labels(split)]))


def test_a_split_lacking_a_class_keeps_each_image_its_own_class(tmp_path):
    # torchvision numbers each split's classes by that split's own folders: test's dog is its 0
    parts = _folders(tmp_path / "d", {"train": ["cat", "dog", "fox"], "test": ["dog", "fox"]})
    assert parts["test"].class_to_idx == {"dog": 0, "fox": 1}
    cache = open_cache(featurecache.extract(source=parts, root=str(tmp_path / "cache"), **SETTINGS).path)
    assert cache.classes == ["cat", "dog", "fox"]
    assert _rows(cache, "train") == [(f"train/{c}/{c}_{i}.png", c) for c in ("cat", "dog", "fox") for i in range(2)]
    assert _rows(cache, "test") == [(f"test/{c}/{c}_{i}.png", c) for c in ("dog", "fox") for i in range(2)]


def test_splits_numbering_classes_differently_are_read_by_their_own_names(tmp_path):
    # val lacks the first class, test lacks the middle one: three numberings of the same names
    parts = _folders(tmp_path / "d", {"train": ["cat", "dog", "fox", "owl"], "val": ["dog", "fox", "owl"],
                                      "test": ["cat", "fox", "owl"]})
    source = from_python(parts)
    assert source.classes == ["cat", "dog", "fox", "owl"]
    rows = [(s.split, s.path, source.classes[s.label]) for s in source.samples]
    expected = [(split, f"{split}/{c}/{c}_{i}.png", c) for split in ("train", "val", "test")
                for c in {"train": ["cat", "dog", "fox", "owl"], "val": ["dog", "fox", "owl"],
                          "test": ["cat", "fox", "owl"]}[split] for i in range(2)]
    assert rows == expected


def test_a_class_only_in_test_is_refused_unless_allow_layout(tmp_path):
    parts = _folders(tmp_path / "d", {"train": ["cat", "dog"], "test": ["dog", "owl"]})
    with pytest.raises(SourceError, match="owl appear in test but not in train"):
        featurecache.extract(source=parts, root=str(tmp_path / "cache"), **SETTINGS)
    source = from_python(parts, allow_layout=True)
    assert source.classes == ["cat", "dog", "owl"]
    assert [(s.path, source.classes[s.label]) for s in source.samples if s.split == "test"] == [
        ("test/dog/dog_0.png", "dog"), ("test/dog/dog_1.png", "dog"),
        ("test/owl/owl_0.png", "owl"), ("test/owl/owl_1.png", "owl")]


class _Named(torch.utils.data.Dataset):
    def __init__(self, labels, classes=None):
        self.targets, self.data = list(labels), np.zeros((len(labels), 8, 8, 3), dtype=np.uint8)
        for i in range(len(labels)):
            self.data[i, 0, 0, 0] = i  # each image its own pixels
        if classes is not None:
            self.classes = classes

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.data[i], self.targets[i]


def test_a_label_outside_its_own_split_names_is_one_error_naming_the_split():
    parts = {"train": _Named([0, 1, 2], ["a", "b", "c"]), "test": _Named([0, 2], ["b", "c"])}
    with pytest.raises(SourceError, match=r"^python: test item 1 has label 2 but the test dataset names only 2 "
                                          r"classes$"):
        from_python(parts, name="python")


def test_a_split_without_names_keeps_its_labels_but_not_past_the_class_count():
    same = from_python({"train": _Named([0, 1, 2], ["a", "b", "c"]), "test": _Named([2, 0])})
    assert [(s.split, same.classes[s.label]) for s in same.samples] == [
        ("train", "a"), ("train", "b"), ("train", "c"), ("test", "c"), ("test", "a")]
    with pytest.raises(SourceError, match="test item 0 has label 3 but there are 3 classes"):
        from_python({"train": _Named([0, 1, 2], ["a", "b", "c"]), "test": _Named([3])})
    with pytest.raises(SourceError, match="test dataset has no class names and the other splits number"):
        from_python({"train": _Named([0, 1, 2], ["a", "b", "c"]), "val": _Named([0, 1], ["b", "c"]),
                     "test": _Named([0])})


def test_splits_with_their_own_unsorted_orders_keep_each_order_and_every_label():
    # neither numbered alike nor sorted: each split's order is kept, a new name placed after
    # the name before it in its own split, and every item keeps its own class name
    source = from_python({"train": _Named([0, 1, 2, 1], ["zebra", "mango", "apple"]),
                          "test": _Named([1, 0], ["zebra", "apple"])})
    assert source.classes == ["zebra", "mango", "apple"]
    assert [(s.split, source.classes[s.label]) for s in source.samples] == [
        ("train", "zebra"), ("train", "mango"), ("train", "apple"), ("train", "mango"),
        ("test", "apple"), ("test", "zebra")]
    inserted = from_python({"train": _Named([1, 0], ["zebra", "apple"]),
                            "test": _Named([2, 1, 0], ["zebra", "mango", "apple"])}, allow_layout=True)
    assert inserted.classes == ["zebra", "mango", "apple"]
    assert [(s.split, inserted.classes[s.label]) for s in inserted.samples] == [
        ("train", "apple"), ("train", "zebra"), ("test", "apple"), ("test", "mango"), ("test", "zebra")]
