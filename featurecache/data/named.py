"""Datasets by name, read from a local root in their official on-disk layout, never downloaded.

`tinyimagenet:ROOT` and `food101:ROOT` are parsed here from their own annotation files;
the classification datasets of `torchvision.datasets` with a fixed layout are read
through torchvision's own parsers with `download=False` (see `torchvision_sources.py`).
ROOT may be the dataset's own folder or the folder that holds it. A missing or
incomplete root is one error naming the layout expected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import SourceError
from .sources import (IMAGE_EXTENSIONS, UNLABELED, FileSource, Sample, Source, _file_fingerprint,
                      split_sort_key)

log = logging.getLogger("featurecache")


@dataclass(frozen=True)
class Named:
    name: str
    layout: str  # what ROOT must hold
    splits: str  # the official splits it gives
    open: Callable[..., Source]


class NamedFileSource(FileSource):
    """Image files under `root`, listed from a dataset's own annotation files."""

    def __init__(self, kind: str, root: Path, classes: list[str], samples: list[Sample], *,
                 class_ids: list[str] | None = None) -> None:
        self.kind = kind
        samples.sort(key=lambda s: (split_sort_key(s.split), s.index))
        super().__init__(kind, str(root), classes, samples)
        self.class_ids = class_ids


def _incomplete(prefix: str, root: Path, layout: str, missing: str) -> SourceError:
    return SourceError(f"{prefix}:{root} is not a complete {NAMED[prefix].name} root ({missing}); "
                       f"expected {layout}")


def _lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError as error:
        raise SourceError(f"cannot read {path}: {error.strerror or error}") from None


def _images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def _unique_names(ids: list[str], names: dict[str, str]) -> list[str]:
    """Readable names for `ids`; a name shared by several ids gets the id appended."""
    chosen = [names.get(i) or i for i in ids]
    seen: dict[str, int] = {}
    for name in chosen:
        seen[name] = seen.get(name, 0) + 1
    return [f"{name} ({i})" if seen[name] > 1 else name for i, name in zip(ids, chosen)]


# ----------------------------------------------------------------------------- Tiny-ImageNet

TINY_LAYOUT = ("tiny-imagenet-200/ holding wnids.txt, words.txt, train/<wnid>/images/*.JPEG, "
               "val/val_annotations.txt with val/images/*.JPEG, and optionally test/images/*.JPEG (unlabelled)")


def tinyimagenet_source(root: Path, *, content_hash: bool = False) -> Source:
    """Tiny-ImageNet-200: train from `train/<wnid>/images/`, val labelled by
    `val/val_annotations.txt`, `test/images/` as an unlabelled test split. Classes are the
    wnids of wnids.txt in sorted order (ImageFolder's order on train/), named from words.txt."""
    base = root if (root / "wnids.txt").exists() else root / "tiny-imagenet-200"
    for needed in ("wnids.txt", "words.txt", "train", "val/val_annotations.txt", "val/images"):
        if not (base / needed).exists():
            raise _incomplete("tinyimagenet", root, TINY_LAYOUT, f"no {needed}")
    wnids = sorted({w for w in _lines(base / "wnids.txt") if w})
    if not wnids:
        raise _incomplete("tinyimagenet", root, TINY_LAYOUT, "wnids.txt is empty")
    words = {}
    for line in _lines(base / "words.txt"):
        wnid, _, text = line.partition("\t")
        words[wnid.strip()] = text.split(",")[0].strip()
    label = {wnid: i for i, wnid in enumerate(wnids)}
    train_dirs = {d.name for d in (base / "train").iterdir() if d.is_dir() and not d.name.startswith(".")}
    if missing := sorted(set(wnids) - train_dirs):
        raise _incomplete("tinyimagenet", root, TINY_LAYOUT, f"no train/{missing[0]}/ ({len(missing)} wnids missing)")
    if extra := sorted(train_dirs - set(wnids)):
        raise _incomplete("tinyimagenet", root, TINY_LAYOUT, f"train/{extra[0]}/ is not in wnids.txt")
    samples: list[Sample] = []

    def add(file: Path, wnid: str, split: str) -> None:
        relpath = file.relative_to(base).as_posix()
        samples.append(Sample(relpath, label[wnid] if wnid else UNLABELED, split,
                              _file_fingerprint(file, relpath, wnid, split, content_hash), len(samples)))

    for wnid in wnids:
        folder = base / "train" / wnid / "images"
        if not folder.is_dir():
            raise _incomplete("tinyimagenet", root, TINY_LAYOUT, f"no train/{wnid}/images/")
        for file in _images(folder):
            add(file, wnid, "train")
    annotated = set()
    for number, line in enumerate(_lines(base / "val" / "val_annotations.txt"), start=1):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label:
            raise SourceError(f"{base / 'val' / 'val_annotations.txt'}:{number}: expected "
                              f"'<file>\\t<wnid>\\t...' with a wnid of wnids.txt, got {line[:80]!r}")
        file = base / "val" / "images" / fields[0]
        if not file.is_file():
            raise _incomplete("tinyimagenet", root, TINY_LAYOUT, f"val/images/{fields[0]} of val_annotations.txt "
                                                                  f"line {number} is missing")
        if fields[0] in annotated:  # counted twice in val's denominator, or one image under two classes
            raise SourceError(f"{base / 'val' / 'val_annotations.txt'}:{number}: {fields[0]} is listed again; "
                              "each val image needs exactly one line")
        annotated.add(fields[0])
        add(file, fields[1], "val")
    if unannotated := [f.name for f in _images(base / "val" / "images") if f.name not in annotated]:
        raise _incomplete("tinyimagenet", root, TINY_LAYOUT, f"val/images/{unannotated[0]} has no line in "
                                                              f"val_annotations.txt ({len(unannotated)} such images)")
    if (base / "test" / "images").is_dir():
        for file in _images(base / "test" / "images"):
            add(file, "", "test")
    source = NamedFileSource("tinyimagenet", base.resolve(), _unique_names(wnids, words), samples, class_ids=wnids)
    return source


# ----------------------------------------------------------------------------- Food-101

FOOD_LAYOUT = ("food-101/ holding images/<class>/<id>.jpg, meta/classes.txt, meta/train.txt and meta/test.txt "
               "(lines <class>/<id>)")


def food101_source(root: Path, *, content_hash: bool = False) -> Source:
    """Food-101: the official split of meta/train.txt and meta/test.txt (lines `<class>/<id>`,
    images at `images/<class>/<id>.jpg`), classes in the order of meta/classes.txt."""
    base = root if (root / "meta" / "classes.txt").exists() else root / "food-101"
    for needed in ("meta/classes.txt", "meta/train.txt", "meta/test.txt", "images"):
        if not (base / needed).exists():
            raise _incomplete("food101", root, FOOD_LAYOUT, f"no {needed}")
    classes = [c for c in _lines(base / "meta" / "classes.txt") if c]
    if len(set(classes)) != len(classes) or not classes:
        raise _incomplete("food101", root, FOOD_LAYOUT, "meta/classes.txt is empty or repeats a class")
    label = {name: i for i, name in enumerate(classes)}
    samples: list[Sample] = []
    listed: set[str] = set()
    for split in ("train", "test"):
        listing = base / "meta" / f"{split}.txt"
        for number, line in enumerate(_lines(listing), start=1):
            if not line:
                continue
            name, _, _ = line.partition("/")
            if name not in label:
                raise SourceError(f"{listing}:{number}: {line!r} does not start with a class of meta/classes.txt")
            file = base / "images" / f"{line}.jpg"
            if not file.is_file():
                raise _incomplete("food101", root, FOOD_LAYOUT, f"images/{line}.jpg of meta/{split}.txt line {number} "
                                                                 "is missing")
            if line in listed:
                raise SourceError(f"{listing}:{number}: {line} is listed twice (train and test must not overlap)")
            listed.add(line)
            relpath = file.relative_to(base).as_posix()
            samples.append(Sample(relpath, label[name], split,
                                  _file_fingerprint(file, relpath, name, split, content_hash), len(samples)))
    unlisted = sum(1 for name in classes if (base / "images" / name).is_dir()
                   for f in _images(base / "images" / name) if f"{name}/{f.stem}" not in listed)
    if unlisted:
        log.warning("food101: %d images under images/ are in neither meta/train.txt nor meta/test.txt; "
                    "they are not extracted", unlisted)
    return NamedFileSource("food101", base.resolve(), classes, samples)


# ----------------------------------------------------------------------------- registry

NAMED: dict[str, Named] = {
    "tinyimagenet": Named("Tiny-ImageNet-200", TINY_LAYOUT, "train 100,000, val 10,000, test 10,000 (unlabelled)",
                          tinyimagenet_source),
    "food101": Named("Food-101", FOOD_LAYOUT, "train 75,750, test 25,250", food101_source),
}


def _register_torchvision() -> None:
    import functools

    from .torchvision_datasets import TORCHVISION

    for prefix, entry in TORCHVISION.items():
        NAMED.setdefault(prefix, Named(entry.title, entry.layout, entry.splits,
                                       functools.partial(entry.open, prefix=prefix)))


_register_torchvision()


def open_named(prefix: str, root: Path, *, content_hash: bool = False, allow_layout: bool = False) -> Source:
    """A named dataset; its classes are checked as an image folder's are (a single class, a class
    only in val/test, Dog/dog: a damaged or partial copy) unless `allow_layout`."""
    named = NAMED[prefix]
    if not root.is_dir():
        raise SourceError(f"{prefix}:{root}: no such folder; expected {named.layout}")
    source = named.open(root.resolve(), content_hash=content_hash)
    if not allow_layout:
        from .layout_checks import check_classes

        check_classes(f"{prefix}:{root}", source.classes, source.samples)
    return source


def describe_sources() -> list[tuple[str, str, str]]:
    """(source syntax, layout expected, splits) for `featurecache sources`."""
    rows = [
        ("DIR", "an image folder: DIR/<class>/*.jpg or DIR/{train,val,test}/<class>/*.jpg "
                "(--unlabeled SPLIT for a split of images without classes)", "train, or the split folders"),
        ("FILE.csv", "header path,label[,split]; paths relative to the CSV; an empty label makes an "
                     "unlabelled row (its split must be named)", "from the split column (train without one)"),
        ("digits", "scikit-learn's 1,797 8x8 digits, embedded", "train 1,078, val 359, test 360 (seeded)"),
        ("cifar10:ROOT", "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)", "train 50,000, test 10,000"),
        ("cifar100:ROOT", "cifar-100-python/ (train, test, meta); fine labels", "train 50,000, test 10,000"),
        ("cifar100-coarse:ROOT", "cifar-100-python/; the 20 coarse labels", "train 50,000, test 10,000"),
    ]
    rows += [(f"{prefix}:ROOT", named.layout, named.splits) for prefix, named in NAMED.items()]
    rows.append(("hf:PATH",
                 "a Hugging Face dataset saved with save_to_disk (Dataset or DatasetDict), or its parquet files as a Hub "
                 "repository holds them (PATH/train-*.parquet, PATH/data/train-00000-of-00001.parquet); images from the "
                 "Image column, labels and class names from the ClassLabel column; hf:PATH?image=COL&label=COL names "
                 "them (needs the datasets package)",
                 "the dataset's own (validation -> val; no label column or all -1: unlabelled)"))
    return rows
