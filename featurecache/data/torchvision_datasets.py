"""The classification datasets of `torchvision.datasets` with a fixed on-disk layout,
read through torchvision's own parsers with `download=False` and their official splits.

`PREFIX:ROOT`, where ROOT is the folder torchvision's `root=` expects (the one holding
`flowers-102/`, `dtd/`, ...) or that dataset folder itself. Datasets without an
official split (EuroSAT, Caltech101, SUN397) give one `train` split; fitting carves
validation from it. torchvision is imported only when such a source is opened.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import SourceError
from .sources import IMAGE_EXTENSIONS, Source


@dataclass(frozen=True)
class TorchvisionDataset:
    title: str
    folder: str | None  # the dataset's own folder under torchvision's root (None: root itself)
    layout: str
    splits: str
    parts: Callable[[object, str], dict]  # (torchvision.datasets, root) -> {split: dataset}
    classes: tuple[str, ...] | None = None  # where the dataset object has no class names

    def open(self, root: Path, *, content_hash: bool = False, prefix: str = "") -> Source:
        from .python_objects import DatasetSource

        import torchvision.datasets as datasets

        # ROOT is torchvision's root (holding the dataset's folder) or the dataset's folder itself.
        roots = [root] + ([root.parent] if self.folder and root.name == self.folder else [])
        try:
            try:
                parts = self.parts(datasets, str(roots[0]))
            except (RuntimeError, OSError, ValueError, KeyError, IndexError, TypeError):
                if len(roots) == 1:
                    raise
                parts = self.parts(datasets, str(roots[1]))
        except (RuntimeError, OSError, ValueError, KeyError, IndexError, TypeError) as error:
            reason = str(error).split("\n")[0].replace("You can use download=True to download it", "").strip(" .")
            raise SourceError(f"{prefix}:{root} is not a complete {self.title} root ({reason or type(error).__name__}); "
                              f"expected {self.layout}") from None
        # open_named checks the classes (one class, a class only in val/test, Dog/dog) unless --allow-layout
        source = DatasetSource(prefix, parts, kind=prefix, classes=list(self.classes) if self.classes else None,
                               allow_layout=True, content_hash=content_hash)
        if prefix == "imagenet":
            _imagenet_names(source, parts)
        return source


def _imagenet_names(source: Source, parts: dict) -> None:
    """ImageNet's classes are tuples of synonyms: name each by its first, keep the wnids."""
    from .named import _unique_names

    synonyms = {w: names for dataset in parts.values() for w, names in zip(dataset.wnids, dataset.classes)}
    wnids = list(source.classes)  # the union of the splits' wnids (DatasetSource reads each split's own)
    source.class_ids = wnids
    source.classes = _unique_names(wnids, {w: synonyms[w][0] for w in wnids})


def _caltech101(d, r: str) -> dict:
    """torchvision's Caltech101 counts each category folder's entries and assumes they are
    image_0001.jpg to image_N.jpg: a .DS_Store became a phantom image (skipped as missing), a gap
    in the numbers a phantom while the last image went unread, and a file among the category
    folders a traceback. Here each category's images are its image_NNNN.jpg files; hidden entries
    and non-image files are ignored (as ImageFolder does), anything else is refused."""
    folder = Path(r) / "caltech101" / "101_ObjectCategories"
    if not folder.is_dir():  # torchvision would first create r/caltech101/ in the user's folder
        raise RuntimeError("Dataset not found or corrupted")
    where = f"caltech101:{folder.parent}: 101_ObjectCategories/"
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir():
            raise SourceError(f"{where}{entry.name} is a file among the category folders, which torchvision's "
                              "Caltech101 reads as a category; remove it")
    dataset = d.Caltech101(r, target_type="category", download=False)
    kept = [k for k, name in enumerate(dataset.categories) if not name.startswith(".")]
    dataset.categories = [dataset.categories[k] for k in kept]
    dataset.annotation_categories = [dataset.annotation_categories[k] for k in kept]
    dataset.index, dataset.y = [], []
    for label, category in enumerate(dataset.categories):
        for entry in sorted(os.scandir(folder / category), key=lambda e: e.name):
            other = entry.is_file() and Path(entry.name).suffix.lower() not in IMAGE_EXTENSIONS  # Thumbs.db
            if entry.name.startswith(".") or other:
                continue
            number = re.fullmatch(r"image_(\d+)\.jpg", entry.name)
            if not (entry.is_file() and number and entry.name == f"image_{int(number[1]):04d}.jpg"):
                raise SourceError(f"{where}{category}/{entry.name} is not an image_NNNN.jpg file, the only kind "
                                  "torchvision's Caltech101 reads; rename it, or move it out of the dataset")
            dataset.index.append(int(number[1]))
            dataset.y.append(label)
    return {"train": dataset}


def _splits(make: Callable[[str], object], splits: dict[str, str]) -> dict:
    return {ours: make(theirs) for ours, theirs in splits.items()}


TORCHVISION: dict[str, TorchvisionDataset] = {
    "flowers102": TorchvisionDataset(
        "Flowers102", "flowers-102", "flowers-102/ holding jpg/image_NNNNN.jpg, imagelabels.mat and setid.mat",
        "train 1,020, val 1,020, test 6,149",
        lambda d, r: _splits(lambda s: d.Flowers102(r, split=s, download=False),
                             {"train": "train", "val": "val", "test": "test"})),
    "oxfordiiitpet": TorchvisionDataset(
        "Oxford-IIIT Pet", "oxford-iiit-pet", "oxford-iiit-pet/ holding images/*.jpg and annotations/trainval.txt, "
        "annotations/test.txt", "train (trainval) 3,680, test 3,669",
        lambda d, r: _splits(lambda s: d.OxfordIIITPet(r, split=s, download=False),
                             {"train": "trainval", "test": "test"})),
    "stanfordcars": TorchvisionDataset(
        "Stanford Cars", "stanford_cars", "stanford_cars/ holding devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
        "cars_train/, cars_test/ and cars_test_annos_withlabels.mat", "train 8,144, test 8,041",
        lambda d, r: _splits(lambda s: d.StanfordCars(r, split=s, download=False), {"train": "train", "test": "test"})),
    "dtd": TorchvisionDataset(
        "DTD", "dtd", "dtd/dtd/ holding images/<class>/*.jpg and labels/train1.txt, val1.txt, test1.txt "
        "(partition 1)", "train 1,880, val 1,880, test 1,880",
        lambda d, r: _splits(lambda s: d.DTD(r, split=s, partition=1, download=False),
                             {"train": "train", "val": "val", "test": "test"})),
    "fgvcaircraft": TorchvisionDataset(
        "FGVC-Aircraft", "fgvc-aircraft-2013b", "fgvc-aircraft-2013b/data/ holding images/*.jpg, variants.txt and "
        "images_variant_train.txt, images_variant_val.txt, images_variant_test.txt", "train 3,334, val 3,333, test 3,333",
        lambda d, r: _splits(lambda s: d.FGVCAircraft(r, split=s, download=False),
                             {"train": "train", "val": "val", "test": "test"})),
    "eurosat": TorchvisionDataset(
        "EuroSAT", "eurosat", "eurosat/2750/<class>/*.jpg", "train 27,000 (no official split)",
        lambda d, r: {"train": d.EuroSAT(r, download=False)}),
    "caltech101": TorchvisionDataset(
        "Caltech101", "caltech101", "caltech101/101_ObjectCategories/<category>/image_NNNN.jpg",
        "train 8,677 (no official split)",
        _caltech101),
    "sun397": TorchvisionDataset(
        "SUN397", "SUN397", "SUN397/ holding ClassName.txt and <letter>/<class>/sun_*.jpg",
        "train 108,753 (no official split)",
        lambda d, r: {"train": d.SUN397(r, download=False)}),
    "stl10": TorchvisionDataset(
        "STL10", "stl10_binary", "stl10_binary/ holding train_X.bin, train_y.bin, test_X.bin, test_y.bin and "
        "class_names.txt", "train 5,000, test 8,000",
        lambda d, r: _splits(lambda s: d.STL10(r, split=s, download=False), {"train": "train", "test": "test"})),
    "svhn": TorchvisionDataset(
        "SVHN", None, "ROOT holding train_32x32.mat and test_32x32.mat", "train 73,257, test 26,032",
        lambda d, r: _splits(lambda s: d.SVHN(r, split=s, download=False), {"train": "train", "test": "test"}),
        classes=tuple(str(digit) for digit in range(10))),
    "mnist": TorchvisionDataset(
        "MNIST", "MNIST", "MNIST/raw/ holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte", "train 60,000, test 10,000",
        lambda d, r: _splits(lambda s: d.MNIST(r, train=s == "train", download=False), {"train": "train", "test": "test"})),
    "fashionmnist": TorchvisionDataset(
        "FashionMNIST", "FashionMNIST", "FashionMNIST/raw/ holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte", "train 60,000, test 10,000",
        lambda d, r: _splits(lambda s: d.FashionMNIST(r, train=s == "train", download=False),
                             {"train": "train", "test": "test"})),
    "imagenet": TorchvisionDataset(
        "ImageNet (ILSVRC2012)", None, "ROOT holding meta.bin (or ILSVRC2012_devkit_t12.tar.gz, parsed into it), "
        "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG", "train 1,281,167, val 50,000",
        lambda d, r: _splits(lambda s: d.ImageNet(r, split=s), {"train": "train", "val": "val"})),
}
