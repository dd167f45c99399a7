"""featurecache.extract(source=...) from Python objects: torchvision datasets, (path, label)
lists and uint8 arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torchvision
from typer.testing import CliRunner

import featurecache
from featurecache import FitSpec, fit_head, open_cache
from featurecache.cli import app
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
