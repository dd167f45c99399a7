"""Datasets held by Python objects, for `featurecache.extract(source=...)`.

Accepted:

- a torchvision dataset object (anything indexable returning `(image, label)` with a
  length), or a dict of them by split: `{"train": ds_train, "test": ds_test}`. Labels
  and file paths are read from the attributes torchvision's datasets keep (`samples`,
  `targets`, `_image_files`, `_labels`, `labels`, `data`, ...) when present, so
  listing decodes no image; otherwise each item is read once. The dataset's own
  `transform`s are not used: featurecache applies the cache's preprocessing.
- a list of `(path, label)` or `(path, label, split)` pairs (label None: unlabelled).
- uint8 image arrays: `(images, labels)`, or a dict by split of `(images, labels)` or
  `images` alone (unlabelled), with an optional `"classes"` entry naming the labels.
- a Hugging Face `datasets.Dataset` or `DatasetDict` (or a dict of Datasets by split),
  read by `hf.py`.

Rows are fingerprinted by a file's path, size and mtime where the dataset has files,
else by a hash of the image's pixels ("content" in `featurecache info`).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import SourceError
from .images import decode_array, load_rgb, to_rgb
from .sources import (SPLIT_ALIASES, UNLABELED, ArraySource, Sample, Source, _file_fingerprint, _fingerprint,
                      sort_labels, split_sort_key)


def _split_name(split: str) -> str:
    return SPLIT_ALIASES.get(str(split).lower(), str(split).lower())


def _as_array(values) -> np.ndarray:
    if hasattr(values, "numpy") and callable(values.numpy):  # a torch tensor
        values = values.detach().cpu().numpy() if hasattr(values, "detach") else values.numpy()
    return np.asarray(values)


def _to_image(item) -> Image.Image:
    """What a dataset's __getitem__ returned as an image, as 8-bit RGB."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    array = _as_array(item)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW (a tensor) -> HWC
    return decode_array(array)


def _without_transforms(dataset):
    """A shallow copy of `dataset` whose transforms are off (featurecache preprocesses)."""
    clone = copy.copy(dataset)
    for name in ("transform", "target_transform", "transforms"):
        if getattr(clone, name, None) is not None:
            try:
                setattr(clone, name, None)
            except AttributeError:
                pass
    return clone


def _file_list(dataset) -> list[str] | None:
    """Each item's image file, where the dataset keeps them (torchvision's conventions)."""
    for name in ("samples", "imgs", "_samples"):
        items = getattr(dataset, name, None)
        if isinstance(items, Sequence) and len(items) == len(dataset) and items and isinstance(items[0], tuple):
            return [str(item[0]) for item in items]
    for name in ("_image_files", "_images"):  # Flowers102, DTD, FGVCAircraft, SUN397; OxfordIIITPet
        files = getattr(dataset, name, None)
        if isinstance(files, Sequence) and len(files) == len(dataset) and not isinstance(files, (str, bytes)):
            return [str(f) for f in files]
    if all(hasattr(dataset, a) for a in ("categories", "index", "y", "root")):  # torchvision's Caltech101
        return [os.path.join(dataset.root, "101_ObjectCategories", dataset.categories[c], f"image_{i:04d}.jpg")
                for c, i in zip(dataset.y, dataset.index)]
    return None


def _label_list(dataset) -> list[int] | None:
    for name in ("samples", "imgs", "_samples"):
        items = getattr(dataset, name, None)
        if isinstance(items, Sequence) and len(items) == len(dataset) and items and isinstance(items[0], tuple):
            return [int(item[1]) for item in items]
    for name in ("targets", "_labels", "labels", "y"):
        values = getattr(dataset, name, None)
        if values is not None and not isinstance(values, (str, bytes)):
            try:
                array = _as_array(values)
            except (TypeError, ValueError):
                continue
            if array.ndim == 1 and len(array) == len(dataset) and np.issubdtype(array.dtype, np.integer):
                return [int(v) for v in array]
    return None


def _pixel_rows(dataset):
    """The dataset's images as one array (CIFAR, MNIST, SVHN, STL10 keep `data`), if so."""
    data = getattr(dataset, "data", None)
    if data is None or isinstance(data, (str, bytes, list)):
        return None
    try:
        array = _as_array(data)
    except (TypeError, ValueError):
        return None
    return array if array.ndim >= 3 and len(array) == len(dataset) else None


def _pixel_hash(values) -> str:
    return hashlib.sha256(np.ascontiguousarray(_as_array(values)).tobytes()).hexdigest()


class DatasetSource(Source):
    """Items of dataset objects (torchvision's or any `(image, label)` sequence), by split."""

    def __init__(self, name: str, parts: Mapping[str, object], *, kind: str = "python:dataset",
                 classes: list[str] | None = None, root: str | None = None, allow_layout: bool = False,
                 content_hash: bool = False) -> None:
        self.kind, self._content_hash = kind, content_hash
        self.parts = {_split_name(split): _without_transforms(ds) for split, ds in parts.items()}
        self._files: dict[str, list[str] | None] = {}
        self._pixels: dict[str, np.ndarray | None] = {}
        labels: dict[str, list[int]] = {}
        for split, dataset in self.parts.items():
            if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
                raise SourceError(f"{name}: the {split} dataset ({type(dataset).__name__}) is not indexable with a "
                                  "length; pass a torchvision dataset or a list of (path, label) pairs")
            self._files[split] = _file_list(dataset)
            self._pixels[split] = None if self._files[split] else _pixel_rows(dataset)
            found = _label_list(dataset)
            labels[split] = found if found is not None else [self._read(split, i)[1] for i in range(len(dataset))]
        classes, labels = self._union_classes(name, labels, classes)
        hidden = [c for c in classes if str(c).startswith(".")]
        if hidden:  # torchvision's folder parsers list every folder: a notebook's checkpoints became a class
            raise SourceError(f"{name}: class {hidden[0]!r} is a hidden folder (a notebook's or the system's), not a "
                              "class; remove it from the dataset's folder")
        roots = [str(root or getattr(ds, "root", "") or "") for ds in self.parts.values()]
        self.base = os.path.commonpath([r for r in roots if r]) if any(roots) else ""
        samples: list[Sample] = []
        for split in sorted(self.parts, key=split_sort_key):
            for i, label in enumerate(labels[split]):
                label = UNLABELED if label is None or label < 0 else int(label)
                if label != UNLABELED and label >= len(classes):
                    raise SourceError(f"{name}: {split} item {i} has label {label} but there are {len(classes)} "
                                      "classes; pass the class names")
                samples.append(self._sample(split, i, label, classes, len(samples)))
        if len({s.path for s in samples}) != len(samples):
            samples = [Sample(f"{s.split}/{s.index:06d}", s.label, s.split, s.fingerprint, s.index) for s in samples]
        if not allow_layout:  # a class only in val/test, one class, Dog/dog: as for a CSV (allow_layout=True skips)
            from .layout_checks import check_classes

            check_classes(name, classes, samples)
        super().__init__(name, self.base or name, classes, samples)
        self._position = {s.path: (s.split, s.index) for s in samples}
        self._fingerprint_kind = "stat" if all(self._files.values()) and not content_hash else "content"

    def _union_classes(self, name: str, labels: dict[str, list[int]], given: list[str] | None
                       ) -> tuple[list[str], dict[str, list[int]]]:
        """One class list for every split, and each split's labels as indices into it.

        torchvision builds `classes` per split (DTD from that split's label file, ImageFolder
        and ImageNet from that split's folders), so a split lacking a class numbers the rest
        differently: each split's labels are read through its own names, then placed in the
        union of the names. A split without names keeps its integer labels."""
        own: dict[str, dict[int, str]] = {}
        for split, dataset in self.parts.items():
            names = _own_names(dataset, labels[split])
            if names is None:
                continue
            for i, label in enumerate(labels[split]):
                if label is not None and label >= 0 and label not in names:
                    raise SourceError(f"{name}: {split} item {i} has label {label} but the {split} dataset names only "
                                      f"{len(names)} classes")
            own[split] = names
        first = next(iter(own.values()), None)
        if given is None and first is not None and all(names == first for names in own.values()) \
                and sorted(first) == list(range(len(first))):
            classes = [first[i] for i in range(len(first))]  # every split numbers them alike: as they are
            if not any(label is not None and label >= len(classes) for values in labels.values() for label in values):
                return classes, labels
        if given is not None:
            classes = [str(c) for c in given]
        elif not own:
            top = max((label for values in labels.values() for label in values if label is not None), default=-1)
            return [str(i) for i in range(top + 1)], labels
        else:
            classes = _merge_names(list(own.values()))
        index = {c: i for i, c in enumerate(classes)}
        nameless = [split for split in self.parts if split not in own]
        if nameless and own and any([names.get(i) for i in range(len(classes))] != classes for names in own.values()):
            raise SourceError(f"{name}: the {', '.join(nameless)} dataset has no class names and the other splits "
                              "number their classes differently, so its labels cannot be placed; give it `classes`")
        remapped = dict(labels)
        for split, names in own.items():
            missing = sorted(set(names.values()) - set(index))
            if missing:
                raise SourceError(f"{name}: the {split} dataset's class(es) {', '.join(missing[:3])} are not among the "
                                  "class names given")
            remapped[split] = [label if label is None or label < 0 else index[names[label]] for label in labels[split]]
        return classes, remapped

    def _read(self, split: str, i: int):
        item = self.parts[split][i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise SourceError(f"item {i} of the {split} dataset is not an (image, label) pair")
        label = item[1]
        try:
            return item[0], (None if label is None else int(_as_array(label).reshape(-1)[0]))
        except (TypeError, ValueError, IndexError):
            raise SourceError(f"item {i} of the {split} dataset has a label that is not an integer: {label!r}") from None

    def _sample(self, split: str, i: int, label: int, classes: list[str], position: int) -> Sample:
        name = classes[label] if label != UNLABELED else ""
        files = self._files[split]
        if files:
            file = Path(files[i])
            relpath = os.path.relpath(file, self.base) if self.base else str(file)
            return Sample(Path(relpath).as_posix(), label, split,
                          _file_fingerprint(file, relpath, name, split, self._content_hash), i)
        pixels = self._pixels[split]
        content = _pixel_hash(pixels[i]) if pixels is not None else _pixel_hash(np.asarray(_to_image(self._read(split, i)[0])))
        return Sample(f"{split}/{i:06d}", label, split, _fingerprint(content, name, split), i)

    def identity(self) -> dict:
        kinds = sorted({f"{type(ds).__module__}.{type(ds).__qualname__}" for ds in self.parts.values()})
        return {**super().identity(), "class": kinds, "splits": {s: len(ds) for s, ds in self.parts.items()}}

    def load(self, sample: Sample) -> Image.Image:
        split, i = self._position[sample.path]
        files = self._files[split]
        if files:
            return load_rgb(Path(files[i]))
        return _to_image(self._read(split, i)[0])

    def content(self, sample: Sample) -> Path | bytes | None:
        split, i = self._position[sample.path]
        files, pixels = self._files[split], self._pixels[split]
        if files:
            return Path(files[i])
        return None if pixels is None else np.ascontiguousarray(pixels[i]).tobytes()


def _own_names(dataset, labels: list[int]) -> dict[int, str] | None:
    """{label: class name} as this dataset (one split) names its own labels, or None."""
    wnids = getattr(dataset, "wnid_to_idx", None)  # torchvision's ImageNet: classes are tuples of synonyms
    if isinstance(wnids, Mapping) and wnids and all(isinstance(k, str) for k in wnids):
        return {int(i): str(w) for w, i in wnids.items()}
    classes = None
    for attr in ("classes", "categories"):
        found = getattr(dataset, attr, None)
        if isinstance(found, Sequence) and found and all(isinstance(c, str) for c in found):
            classes = [str(c) for c in found]
            break
    if classes is not None and type(dataset).__name__ == "OxfordIIITPet":
        # its labels are the official class ids - 1, its classes only those in this split, in id order
        present = sorted({label for label in labels if label is not None and label >= 0})
        if len(present) == len(classes):
            return dict(zip(present, classes))
    mapping = getattr(dataset, "class_to_idx", None)
    if (isinstance(mapping, Mapping) and mapping and all(isinstance(k, str) for k in mapping)
            and sorted(_as_int(v) for v in mapping.values()) == list(range(len(mapping)))):
        return {_as_int(i): str(c) for c, i in mapping.items()}
    return None if classes is None else dict(enumerate(classes))


def _as_int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _merge_names(splits: list[dict[int, str]]) -> list[str]:
    """The union of the splits' class names: as they number them where they all agree
    (so the class list is what it always was), else sorted when each split's list is."""
    names = {c for names in splits for c in names.values()}
    by_label: dict[int, str] = {}
    agree = True
    for own in splits:
        for label, c in own.items():
            agree &= by_label.setdefault(label, c) == c
    agree &= len(set(by_label.values())) == len(by_label)
    if agree:
        return [by_label[label] for label in sorted(by_label)]
    lists = [[own[label] for label in sorted(own)] for own in splits]
    if all(order == sorted(order) for order in lists):
        return sorted(names)
    if all(order == sort_labels(set(order)) for order in lists):
        return sort_labels(names)
    merged: list[str] = []
    for order in lists:  # keep each split's order, a new name after the one before it
        for k, c in enumerate(order):
            if c not in merged:
                before = [merged.index(o) for o in order[:k] if o in merged]
                merged.insert(max(before) + 1 if before else len(merged) if k else 0, c)
    return merged


class PathListSource(Source):
    """A list of (path, label[, split]) pairs; absolute paths, or relative to the working folder."""

    kind = "python:paths"

    def __init__(self, name: str, pairs: Sequence, *, content_hash: bool = False) -> None:
        rows = []
        for number, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) not in (2, 3):
                raise SourceError(f"item {number} of the list is not a (path, label) or (path, label, split) pair")
            path, label = Path(pair[0]).expanduser().resolve(), pair[1]
            split = _split_name(pair[2]) if len(pair) == 3 else "train"
            if label is None and split == "train":
                raise SourceError(f"item {number} ({path}) has no label; give unlabelled items a split (e.g. test)")
            rows.append((path, None if label is None else str(label) if not isinstance(label, (int, np.integer))
                         else int(label), split))
        given = [label for _, label, _ in rows if label is not None]
        if given and all(isinstance(label, int) for label in given):
            classes = [str(i) for i in range(max(given) + 1)]
            index = {i: i for i in range(len(classes))}
        elif any(isinstance(label, int) for label in given):
            raise SourceError("labels must be all integers or all strings")
        else:
            classes = sort_labels(set(given))
            index = {c: i for i, c in enumerate(classes)}
        self.base = os.path.commonpath([str(p.parent) for p, _, _ in rows]) if rows else ""
        samples = []
        for number, (path, label, split) in enumerate(rows):
            relpath = os.path.relpath(path, self.base)
            name = "" if label is None else str(label)
            samples.append(Sample(Path(relpath).as_posix(), UNLABELED if label is None else index[label], split,
                                  _file_fingerprint(path, relpath, name, split, content_hash), number))
        samples.sort(key=lambda s: split_sort_key(s.split))
        super().__init__(name, self.base, classes, samples)
        self._fingerprint_kind = "content" if content_hash else "stat"

    def load(self, sample: Sample) -> Image.Image:
        return load_rgb(Path(self.base) / sample.path)

    def content(self, sample: Sample) -> Path:
        return Path(self.base) / sample.path


def _arrays_source(name: str, parts: Mapping[str, object], classes: list[str] | None) -> ArraySource:
    images, labels, splits = [], [], []
    for split, part in parts.items():
        pixels, values = (part if isinstance(part, tuple) else (part, None))
        pixels = _as_array(pixels)
        if pixels.ndim not in (3, 4) or pixels.dtype != np.uint8:
            raise SourceError(f"{split}: images must be a uint8 array of N x H x W or N x H x W x C, got "
                              f"{pixels.dtype} {pixels.shape}")
        values = np.full(len(pixels), UNLABELED) if values is None else _as_array(values).astype(np.int64).reshape(-1)
        if len(values) != len(pixels):
            raise SourceError(f"{split}: {len(pixels)} images but {len(values)} labels")
        images.append(pixels)
        labels.append(values)
        splits += [_split_name(split)] * len(pixels)
    shapes = {p.shape[1:] for p in images}
    if len(shapes) > 1:
        raise SourceError(f"every split's images must have the same shape, got {sorted(shapes)}")
    labels_all = np.concatenate(labels)
    top = int(labels_all.max(initial=-1))
    classes = list(classes) if classes is not None else [str(i) for i in range(top + 1)]  # ArraySource checks the range
    names = []
    for split in dict.fromkeys(splits):
        names += [f"{split}/{i:06d}" for i in range(splits.count(split))]
    indices = [int(n.rsplit("/", 1)[1]) for n in names]
    return ArraySource(name, f"python:arrays:{name}", [str(c) for c in classes], np.concatenate(images), labels_all,
                       splits, names=names, indices=indices)


def from_python(obj: object, *, name: str | None = None, unlabeled=(),
                columns: Mapping[str, str] | None = None, allow_layout: bool = False,
                content_hash: bool = False) -> Source:
    """A Source for a Python object (see the module's docstring for what is accepted);
    `columns` ({"image": ..., "label": ...}) names a Hugging Face dataset's columns."""
    if _is_huggingface(obj) or (isinstance(obj, Mapping) and obj and _is_huggingface(next(iter(obj.values())))):
        from .hf import from_huggingface

        if unlabeled:
            raise SourceError("unlabeled= applies to image folders; in a Hugging Face dataset, a split without the "
                              "label column (or with every label -1) is unlabelled")
        return from_huggingface(obj, name=name, **(columns or {}))
    if columns:
        raise SourceError("image_column and label_column name the columns of a Hugging Face dataset; this source "
                          f"is a {type(obj).__name__}")
    if unlabeled:
        raise SourceError("unlabeled= applies to image folders; from Python, give unlabelled items label None "
                          "(or an images array without labels)")
    if isinstance(obj, tuple) and len(obj) == 2 and hasattr(obj[0], "shape"):
        source = _arrays_source(name or "arrays", {"train": obj}, None)
    elif isinstance(obj, Mapping) and obj and all(hasattr(v, "shape") or (isinstance(v, tuple) and hasattr(v[0], "shape"))
                                                 for k, v in obj.items() if k != "classes"):
        parts = {k: v for k, v in obj.items() if k != "classes"}
        source = _arrays_source(name or "arrays", parts, obj.get("classes"))
    elif isinstance(obj, Mapping) and obj:
        source = _dataset_source(obj, name, allow_layout, content_hash)
    elif isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], (tuple, list)) and isinstance(obj[0][0], (str, Path)):
        source = PathListSource(name or "paths", obj, content_hash=content_hash)
    elif hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(obj, (str, bytes, list, tuple)):
        source = _dataset_source({"train": obj}, name, allow_layout, content_hash)
    else:
        raise SourceError(f"cannot read a dataset from a {type(obj).__name__}; pass a torchvision dataset (or a dict "
                          "of them by split), a list of (path, label) pairs, or (images, labels) uint8 arrays")
    return source


def _dataset_source(parts: Mapping, name: str | None, allow_layout: bool = False,
                    content_hash: bool = False) -> DatasetSource:
    first = next(iter(parts.values()))
    return DatasetSource(name or type(first).__name__.lower(), parts, allow_layout=allow_layout,
                         content_hash=content_hash)


def _is_huggingface(obj: object) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets"
