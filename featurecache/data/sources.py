"""Datasets: an ImageFolder tree, a CSV manifest, CIFAR-10/100 on disk, or `digits`.

CSV listings live in `csv_source.py`, named layouts (`tinyimagenet:`, `food101:`,
torchvision's datasets) in `named.py`, Python objects in `python_objects.py`, Hugging
Face datasets (`hf:PATH` and `datasets` objects) in `hf.py`, and the checks that refuse
a folder tree that looks wrong in `layout_checks.py`.

Every source lists `Sample`s (relative path, label, split, fingerprint) and loads one
as an RGB PIL image. A sample of an unlabeled split (Tiny-ImageNet's test images, a
folder given with `--unlabeled`, CSV rows without a label) has label `UNLABELED` (-1):
it is cached like any other row and listed in the manifest's `unlabeled_splits`, but
no head is fitted or scored on it. The fingerprint identifies the file's content cheaply (relative
path, size, mtime_ns, class, split; or a content hash on request); the cache reuses a
row whenever its fingerprint is unchanged, which makes extraction incremental.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import SourceError
from .images import ImageDecodeError, decode_array, load_rgb

# JPEG's other names (.jfif: what browsers save) and .pnm decode in every Pillow; formats that need
# a codec Pillow may lack (AVIF, JPEG 2000, HEIC) are not listed
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".jif", ".jfi", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm", ".pbm", ".pnm"}
# images in formats featurecache does not list (Pillow lacks them, or decodes them only with plug-ins):
# left out of a folder, and said so, as a phone's .heic photos would vanish without a word
UNLISTED_IMAGE_EXTENSIONS = {".heic", ".heif", ".avif", ".jp2", ".j2k", ".jpx", ".jxl", ".dng", ".cr2", ".nef",
                             ".arw", ".raw", ".svg", ".psd"}
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
SPLIT_ORDER = ("train", "val", "test")
UNLABELED = -1  # the label of every row of an unlabeled split

log = logging.getLogger("featurecache")


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the source root (or a synthetic id for in-memory sets)
    label: int
    split: str
    fingerprint: str
    index: int  # position in the source's listing


def _fingerprint(*parts: object) -> str:
    # surrogateescape: a file name that is not valid UTF-8 still has a stable fingerprint
    return hashlib.sha256("\0".join(str(p) for p in parts).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def valid_utf8(text: str) -> bool:
    """False for a name that came from bytes that are not UTF-8 (Python keeps them as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_path(text: str) -> str:
    """A path that can be printed and stored as UTF-8: undecodable bytes shown as \\xNN."""
    return text if valid_utf8(text) else text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def split_sort_key(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


class Source:
    """Base class: `samples`, `classes`, `load(sample)` and an identity for the cache key."""

    kind: str = "source"

    def __init__(self, name: str, root: str, classes: list[str], samples: list[Sample]) -> None:
        if not samples:
            raise SourceError(f"no images found in {root}; check the path and that it holds image files")
        self.name, self.root, self.classes, self.samples = name, root, classes, samples
        self.class_ids: list[str] | None = None  # e.g. Tiny-ImageNet's wnids, when names differ from ids
        labeled = {s.split for s in samples if s.label != UNLABELED}
        unlabeled = {s.split for s in samples if s.label == UNLABELED}
        if labeled & unlabeled:
            split = sorted(labeled & unlabeled, key=split_sort_key)[0]
            raise SourceError(f"split {split!r} of {root} mixes labelled and unlabelled rows; give the unlabelled "
                              "rows a split of their own (e.g. test)")
        if "train" in unlabeled:
            raise SourceError(f"the train split of {root} has no labels; only val or test splits may be unlabelled")
        self.unlabeled_splits = sorted(unlabeled, key=split_sort_key)

    identity_extra: dict = {}  # what else changes the rows (e.g. how CIFAR names them)

    def identity(self) -> dict:
        return {"kind": self.kind, "name": self.name, "root": self.root, **self.identity_extra}

    @property
    def fingerprint_kind(self) -> str:
        """How rows are fingerprinted: "stat" (path, size, mtime) or "content" (a hash of the bytes)."""
        return getattr(self, "_fingerprint_kind", "stat")

    def load(self, sample: Sample) -> Image.Image:
        raise NotImplementedError

    def content(self, sample: Sample) -> Path | bytes | None:
        """The image's file or bytes, for finding copies (data/copies.py); None: not comparable."""
        return None

    def split_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for sample in self.samples:
            counts[sample.split] = counts.get(sample.split, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: split_sort_key(item[0])))


class FileSource(Source):
    """A source whose samples are image files under `root`."""

    draft_size: tuple[int, int] | None = None  # set by extract for JPEG draft decoding

    def load(self, sample: Sample) -> Image.Image:
        if not valid_utf8(sample.path):  # its name could not be stored in the cache (UTF-8 paths)
            raise ImageDecodeError("file name is not valid UTF-8; rename it to include it",
                                   printable_path(sample.path))
        return load_rgb(Path(self.root) / sample.path, draft_size=self.draft_size)

    def content(self, sample: Sample) -> Path:
        return Path(self.root) / sample.path


def _file_fingerprint(path: Path, relpath: str, class_name: str, split: str, content_hash: bool) -> str:
    try:
        if content_hash:
            with open(path, "rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            return _fingerprint(relpath, digest, class_name, split)
        stat = path.stat()
        return _fingerprint(relpath, stat.st_size, stat.st_mtime_ns, class_name, split)
    except OSError as error:  # unreadable: still listed, so the failure is reported
        return _fingerprint(relpath, "unreadable", error.errno, class_name, split)


def _unreadable_folder(error: OSError) -> None:
    raise SourceError(f"cannot read the folder {printable_path(str(error.filename))}: "
                      f"{(error.strerror or str(error)).lower()}; fix its permissions or move it out of the dataset")


def _folder_id(path: str) -> tuple[int, int]:
    try:
        status = os.stat(path)
    except OSError as error:
        _unreadable_folder(error)
    return status.st_dev, status.st_ino


def image_files_under(directory: Path, unlisted: list[Path] | None = None) -> list[Path]:
    """The image files at any depth under `directory`, following symlinked folders (as ImageFolder
    does; one file reached twice is `refuse_same_files`'s) but never one back to a folder above it
    (a loop, or the other classes read into this one). An unreadable folder is an error, never a
    silently empty class. Images in formats not listed (.heic ...) are added to `unlisted`."""
    files = []
    above = {os.fspath(directory): {_folder_id(os.fspath(p)) for p in (directory, *directory.parents)}}
    for dirpath, dirnames, filenames in os.walk(directory, onerror=_unreadable_folder, followlinks=True):
        chain, kept = above.pop(dirpath), []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            path = os.path.join(dirpath, name)
            if (folder := _folder_id(path)) in chain:
                log.warning("%s links back to a folder above it (a loop); it is not followed", printable_path(path))
                continue
            above[path] = chain | {folder}
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(f for f in filenames if not f.startswith(".")):
            suffix = Path(name).suffix.lower()
            if suffix in IMAGE_EXTENSIONS:
                files.append(Path(dirpath) / name)
            elif unlisted is not None and suffix in UNLISTED_IMAGE_EXTENSIONS:
                unlisted.append(Path(dirpath) / name)
    return files


def warn_unlisted(root: Path, unlisted: list[Path]) -> None:
    """One warning for the images left out for their format, counted by extension."""
    if unlisted:
        counts = Counter(file.suffix.lower() for file in unlisted)
        kinds = ", ".join(f"{n} {suffix}" for suffix, n in sorted(counts.items()))
        log.warning("%d image file(s) under %s are in formats featurecache does not read (%s; e.g. %s) and are left "
                    "out; convert them to JPEG or PNG to include them", len(unlisted), printable_path(str(root)),
                    kinds, printable_path(unlisted[0].relative_to(root).as_posix()))


class ImageFolderSource(FileSource):
    """`root/<class>/*.jpg`, or `root/{train,val,test}/<class>/*.jpg` with splits.

    `unlabeled` names split folders whose images (at any depth) have no label. The
    layout is checked before any work (see `layout.check_image_folder`) unless
    `allow_layout` is set.
    """

    kind = "imagefolder"

    def __init__(self, root: Path, *, content_hash: bool = False, unlabeled: tuple[str, ...] = (),
                 allow_layout: bool = False) -> None:
        from .layout_checks import check_image_folder, check_known_layout

        if not allow_layout:
            check_known_layout(root)
        try:
            entries = sorted(root.iterdir())
            split_dirs: dict[str, Path] = {}
            for d in (d for d in entries if d.is_dir() and d.name.lower() in SPLIT_ALIASES):
                split = SPLIT_ALIASES[d.name.lower()]
                if split in split_dirs:  # the last one won, and the other's images vanished
                    raise SourceError(f"{root}: folders {split_dirs[split].name}/ and {d.name}/ both name the "
                                      f"{split} split; merge them into one, or rename one")
                split_dirs[split] = d
            if split_dirs and not allow_layout:
                from .layout_checks import check_beside_splits

                check_beside_splits(root, split_dirs, {d.name: len(image_files_under(d)) for d in entries if d.is_dir()
                                                       and d.name.lower() not in SPLIT_ALIASES
                                                       and not d.name.startswith(".")},
                                    sum(f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                                        and not f.name.startswith(".") for f in entries))
        except OSError as error:
            _unreadable_folder(error)
        unlabeled_splits = {SPLIT_ALIASES.get(u.lower(), u.lower()) for u in unlabeled}
        missing = sorted(unlabeled_splits - set(split_dirs))
        if missing:
            raise SourceError(f"--unlabeled {missing[0]}: {root} has no {missing[0]}/ split folder "
                              f"(it has: {', '.join(sorted(split_dirs)) or 'no train/val/test folders'}); "
                              "--unlabeled names a split folder of an image folder with splits")
        unlisted: list[Path] = []
        unlabeled_files = {split: image_files_under(split_dirs[split], unlisted) for split in sorted(unlabeled_splits)}
        if not allow_layout:
            from .layout_checks import refuse_labelled_as_unlabeled

            for split, found in unlabeled_files.items():
                inside = [f.relative_to(split_dirs[split]).parts for f in found]
                refuse_labelled_as_unlabeled(root, split_dirs[split], split, {parts[0] for parts in inside
                                                                              if len(parts) > 1})
        if not split_dirs:
            split_dirs = {"train": root}
        try:
            class_dirs = {split: sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
                          for split, path in split_dirs.items() if split not in unlabeled_splits}
        except OSError as error:
            _unreadable_folder(error)
        undecodable = [d.name for dirs in class_dirs.values() for d in dirs if not valid_utf8(d.name)]
        if undecodable:
            raise SourceError(f"the class folder {printable_path(undecodable[0])!r} is not named in valid UTF-8, so "
                              "its class name cannot be stored; rename it")
        files = {(split, d.name): image_files_under(d, unlisted) for split, dirs in class_dirs.items() for d in dirs}
        warn_unlisted(root, unlisted)
        loose = {split: [f for f in sorted(path.iterdir()) if f.is_file() and not f.name.startswith(".")
                         and f.suffix.lower() in IMAGE_EXTENSIONS]
                 for split, path in split_dirs.items() if split not in unlabeled_splits}
        if split_dirs != {"train": root}:
            from .layout_checks import refuse_empty_splits

            found = {split: len(unlabeled_files[split]) if split in unlabeled_splits
                     else len(loose[split]) + sum(len(files[split, d.name]) for d in class_dirs[split])
                     for split in sorted(split_dirs, key=split_sort_key)}
            refuse_empty_splits(root, split_dirs, found, allow_layout=allow_layout)
        if not allow_layout:
            from .layout_checks import check_class_depth

            check_class_depth(root, {d.relative_to(root).as_posix(): any(f.parent == d for f in files[split, d.name])
                                     for split, dirs in class_dirs.items() for d in dirs if files[split, d.name]})
            check_image_folder(root, {split: {d.name: len(files[split, d.name]) for d in dirs}
                                      for split, dirs in class_dirs.items()},
                               {split: len(found) for split, found in loose.items() if found},
                               has_splits=split_dirs != {"train": root})
        classes = sorted({d.name for dirs in class_dirs.values() for d in dirs})
        samples: list[Sample] = []
        for split in sorted(split_dirs, key=split_sort_key):
            if split in unlabeled_splits:
                for file in unlabeled_files[split]:
                    relpath = file.relative_to(root).as_posix()
                    fingerprint = _file_fingerprint(file, relpath, "", split, content_hash)
                    samples.append(Sample(relpath, UNLABELED, split, fingerprint, len(samples)))
                continue
            for class_dir in class_dirs[split]:
                for file in files[split, class_dir.name]:
                    relpath = file.relative_to(root).as_posix()
                    fingerprint = _file_fingerprint(file, relpath, class_dir.name, split, content_hash)
                    samples.append(Sample(relpath, classes.index(class_dir.name), split, fingerprint, len(samples)))
        if not allow_layout:
            from .layout_checks import refuse_same_files

            refuse_same_files(str(root), root, [s.path for s in samples])
        super().__init__(root.name, str(root), classes, samples)
        self.unlabeled = tuple(sorted(unlabeled_splits, key=split_sort_key))

    def identity(self) -> dict:
        return {**super().identity(), **({"unlabeled": list(self.unlabeled)} if self.unlabeled else {})}


def sort_labels(labels: set[str]) -> list[str]:
    """Labels in numeric order when every one is a number (`2` before `10`), else as text."""
    def number(text: str) -> float | None:
        try:
            value = float(text)
        except ValueError:
            return None
        return value if value == value and abs(value) != float("inf") else None

    values = {label: number(label) for label in labels}
    if labels and all(v is not None for v in values.values()):
        return sorted(labels, key=lambda label: (values[label], label))
    return sorted(labels)


class ArraySource(Source):
    """Images held in memory as arrays (digits, CIFAR, uint8 arrays from Python).

    `names` gives each image's path (default `<name>/<split>/<position>`) and `indices`
    the index stored with it (default its position in `images`). Rows are fingerprinted
    by content: there is no file to stat.
    """

    kind = "arrays"
    _fingerprint_kind = "content"

    def __init__(self, name: str, root: str, classes: list[str], images: np.ndarray,
                 labels: np.ndarray, splits: list[str], max_value: float = 255.0, *,
                 names: list[str] | None = None, indices: list[int] | None = None) -> None:
        self.images, self.max_value = images, max_value
        order = sorted(range(len(labels)), key=lambda i: (split_sort_key(splits[i]), i))
        paths = names or [f"{name}/{splits[i]}/{i:06d}" for i in range(len(labels))]
        if len(set(paths)) != len(paths):
            raise SourceError(f"{name}: two images have the same name; names must be unique")
        self._position = {paths[i]: i for i in range(len(labels))}
        given = np.asarray(labels, dtype=np.int64)
        outside = np.flatnonzero((given != UNLABELED) & ((given < 0) | (given >= len(classes))))
        if outside.size:  # a label beyond the names: a traceback, or a row under another class
            i = int(outside[0])
            raise SourceError(f"{name}: {paths[i]} has label {given[i]}, but {len(classes)} class names are given "
                              f"(labels 0..{len(classes) - 1}); {outside.size} row(s) like it. The labels and the "
                              "class names do not belong together")
        samples = [
            Sample(paths[i], int(labels[i]), splits[i],
                   _fingerprint(hashlib.sha256(np.ascontiguousarray(images[i]).tobytes()).hexdigest(),
                                classes[int(labels[i])] if int(labels[i]) != UNLABELED else "", splits[i]),
                   i if indices is None else int(indices[i]))
            for i in order
        ]
        super().__init__(name, root, classes, samples)

    def load(self, sample: Sample) -> Image.Image:
        return decode_array(self.images[self._position[sample.path]], max_value=self.max_value)

    def content(self, sample: Sample) -> bytes:
        return np.ascontiguousarray(self.images[self._position[sample.path]]).tobytes()


def digits_source() -> ArraySource:
    """scikit-learn's 1,797 real 8x8 handwritten digits, split 60/20/20 with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    indices = np.arange(len(data.target))
    train, rest = train_test_split(indices, test_size=0.4, random_state=0, stratify=data.target)
    val, test = train_test_split(rest, test_size=0.5, random_state=0, stratify=data.target[rest])
    splits = [""] * len(indices)
    for split, members in (("train", train), ("val", val), ("test", test)):
        for i in members:
            splits[i] = split
    return ArraySource("digits", "sklearn:digits", [str(d) for d in range(10)],
                       data.images.astype(np.float32), data.target, splits, max_value=16.0)


CIFAR_VARIANTS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python",
                  "cifar100-coarse": "cifar-100-python"}  # read by data/cifar.py


def open_source(spec: str, *, content_hash: bool = False, allow_layout: bool = False,
                unlabeled: tuple[str, ...] = ()) -> Source:
    """Open `digits`, `cifar10:ROOT`, a named layout (`tinyimagenet:ROOT`, `food101:ROOT`,
    torchvision's datasets: see `featurecache sources`), a Hugging Face dataset on disk
    (`hf:PATH`, see hf.py), an image folder or a CSV file."""
    if spec.lower() == "digits":
        return digits_source()
    prefix, _, rest = spec.partition(":")
    prefix = prefix.lower()
    if prefix == "python" and rest:
        raise SourceError(f"this cache was extracted from a Python object ({rest}), which cannot be reopened "
                          "from its manifest; pass the same object again from Python (featurecache.extract(source=...)), "
                          "or use what the cache holds (e.g. finetune --from-cache)")
    if unlabeled and (prefix in CIFAR_VARIANTS or prefix == "digits"):
        raise SourceError("--unlabeled applies to an image folder with split folders")
    if prefix in CIFAR_VARIANTS and rest:
        from .cifar import cifar_source

        return cifar_source(Path(rest).expanduser(), prefix)
    if prefix == "hf":
        if unlabeled:
            raise SourceError("--unlabeled applies to an image folder; in an hf: dataset, a split without the label "
                              "column (or with every label -1) is unlabelled")
        from .hf import open_hf

        return open_hf(rest, content_hash=content_hash, allow_layout=allow_layout)
    from .named import NAMED, open_named

    if prefix in NAMED and rest:
        if unlabeled:
            raise SourceError(f"--unlabeled applies to an image folder; {prefix}: has its own splits")
        return open_named(prefix, Path(rest).expanduser(), content_hash=content_hash, allow_layout=allow_layout)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ImageFolderSource(path.resolve(), content_hash=content_hash, unlabeled=unlabeled,
                                 allow_layout=allow_layout)
    if path.is_file() and path.suffix.lower() == ".csv":
        from .csv_source import CsvSource

        if unlabeled:
            raise SourceError("--unlabeled applies to an image folder; in a CSV, leave the label empty and name the split")
        return CsvSource(path.resolve(), content_hash=content_hash, allow_layout=allow_layout)
    known = ("an image folder, a CSV, digits, cifar10:ROOT, hf:PATH or another named dataset (featurecache sources "
             "lists them)")
    if prefix in NAMED or prefix in CIFAR_VARIANTS:
        raise SourceError(f"{spec}: give the dataset's local folder after the colon, e.g. {prefix}:/data")
    if path.exists():
        raise SourceError(f"{spec} is neither a folder nor a .csv file; pass {known}")
    raise SourceError(f"dataset not found: {spec}; pass {known}")


def reopen_source(made: dict) -> Source:
    """The source of a cache entry again, from the `spec` its manifest stored (layout
    checks off: the entry exists, so the layout was accepted when it was made)."""
    return open_source(made["source"], content_hash=made.get("content_hash", False), allow_layout=True,
                       unlabeled=tuple(made.get("unlabeled") or ()))
