"""Datasets: an ImageFolder tree, a CSV manifest, CIFAR-10/100 on disk, or `digits`.

Every source lists `Sample`s (relative path, label, split, fingerprint) and loads one
as an RGB PIL image. The fingerprint identifies the file's content cheaply (relative
path, size, mtime_ns, class, split; or a content hash on request); the cache reuses a
row whenever its fingerprint is unchanged, which makes extraction incremental.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import SourceError
from .images import ImageDecodeError, decode_array, load_rgb

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
SPLIT_ORDER = ("train", "val", "test")


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

    def identity(self) -> dict:
        return {"kind": self.kind, "name": self.name, "root": self.root}

    def load(self, sample: Sample) -> Image.Image:
        raise NotImplementedError

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


def _image_files(directory: Path) -> list[Path]:
    files = []
    # does not follow symlinked dirs; an unreadable folder is an error, never a silently empty class
    for dirpath, dirnames, filenames in os.walk(directory, onerror=_unreadable_folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames)
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return files


class ImageFolderSource(FileSource):
    """`root/<class>/*.jpg`, or `root/{train,val,test}/<class>/*.jpg` with splits."""

    kind = "imagefolder"

    def __init__(self, root: Path, *, content_hash: bool = False) -> None:
        try:
            split_dirs = {SPLIT_ALIASES[d.name.lower()]: d for d in sorted(root.iterdir())
                          if d.is_dir() and d.name.lower() in SPLIT_ALIASES}
            if not split_dirs:
                split_dirs = {"train": root}
            class_dirs = {split: sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
                          for split, path in split_dirs.items()}
        except OSError as error:
            _unreadable_folder(error)
        undecodable = [d.name for dirs in class_dirs.values() for d in dirs if not valid_utf8(d.name)]
        if undecodable:
            raise SourceError(f"the class folder {printable_path(undecodable[0])!r} is not named in valid UTF-8, so "
                              "its class name cannot be stored; rename it")
        classes = sorted({d.name for dirs in class_dirs.values() for d in dirs})
        samples: list[Sample] = []
        for split in sorted(class_dirs, key=split_sort_key):
            for class_dir in class_dirs[split]:
                for file in _image_files(class_dir):
                    relpath = file.relative_to(root).as_posix()
                    fingerprint = _file_fingerprint(file, relpath, class_dir.name, split, content_hash)
                    samples.append(Sample(relpath, classes.index(class_dir.name), split, fingerprint, len(samples)))
        super().__init__(root.name, str(root), classes, samples)


class CsvSource(FileSource):
    """A CSV with a header `path,label[,split]`; paths relative to the CSV's folder."""

    kind = "csv"

    def __init__(self, csv_path: Path, *, content_hash: bool = False) -> None:
        rows = _read_csv_rows(csv_path)
        classes = sorted({label for _, label, _ in rows})
        base = csv_path.parent
        samples = []
        for index, (path, label, split) in enumerate(rows):
            file = Path(path) if os.path.isabs(path) else base / path
            relpath = os.path.relpath(file, base) if not os.path.isabs(path) else path
            fingerprint = _file_fingerprint(file, relpath, label, split, content_hash)
            samples.append(Sample(Path(relpath).as_posix(), classes.index(label), split, fingerprint, index))
        samples.sort(key=lambda s: split_sort_key(s.split))  # stable: CSV order within a split
        super().__init__(csv_path.stem, str(base), classes, samples)
        self.csv_path = str(csv_path)

    def identity(self) -> dict:
        return {**super().identity(), "csv": self.csv_path}


def _read_csv_rows(csv_path: Path) -> list[tuple[str, str, str]]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            if "path" not in header or "label" not in header:
                raise SourceError(f"{csv_path}: the first line must be a header with path,label[,split]")
            reader.fieldnames = header
            rows = []
            for line_number, row in enumerate(reader, start=2):
                path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
                split = (row.get("split") or "train").strip().lower() or "train"
                if not path or not label:
                    raise SourceError(f"{csv_path}:{line_number}: every row needs a path and a label")
                split = SPLIT_ALIASES.get(split, split)
                if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", split):
                    raise SourceError(f"{csv_path}:{line_number}: split {split!r} is not a plain name (letters, "
                                      "digits, '_' or '-'); shard files are named after it")
                rows.append((path, label, split))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise SourceError(f"cannot read CSV {csv_path}: {error}") from None
    return rows


class ArraySource(Source):
    """Images held in memory as arrays (digits, CIFAR)."""

    kind = "arrays"

    def __init__(self, name: str, root: str, classes: list[str], images: np.ndarray,
                 labels: np.ndarray, splits: list[str], max_value: float = 255.0) -> None:
        self.images, self.max_value = images, max_value
        order = sorted(range(len(labels)), key=lambda i: (split_sort_key(splits[i]), i))
        samples = [
            Sample(f"{name}/{splits[i]}/{i:06d}", int(labels[i]), splits[i],
                   _fingerprint(hashlib.sha256(images[i].tobytes()).hexdigest(), classes[int(labels[i])], splits[i]), i)
            for i in order
        ]
        super().__init__(name, root, classes, samples)

    def load(self, sample: Sample) -> Image.Image:
        return decode_array(self.images[sample.index], max_value=self.max_value)


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


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles; allow only what a dict of numpy arrays needs."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)


def _load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            data = _ArrayOnlyUnpickler(io.BytesIO(handle.read()), encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise SourceError(f"cannot read CIFAR batch {path}: {error}") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def cifar_source(root: Path, variant: str) -> ArraySource:
    """CIFAR-10 or CIFAR-100 from the python batches under `root` (never downloaded)."""
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[variant]
    base = root if (root / ("batches.meta" if variant == "cifar10" else "meta")).exists() else root / folder
    if variant == "cifar10":
        parts, meta, names_key, labels_key = ([f"data_batch_{i}" for i in range(1, 6)], "test_batch"), "batches.meta", "label_names", "labels"
    else:
        parts, meta, names_key, labels_key = (["train"], "test"), "meta", "fine_label_names", "fine_labels"
    if not (base / meta).exists():
        raise SourceError(
            f"{variant} not found under {root} (expected {folder}/ with the python batches); "
            f"download it on a connected machine and pass {variant}:/path/to/its/parent"
        )
    classes = [str(n) for n in _load_batch(base / meta)[names_key]]
    images, labels, splits = [], [], []
    for split, files in (("train", parts[0]), ("test", [parts[1]])):
        for file in files:
            batch = _load_batch(base / file)
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            images.append(data)
            labels += list(batch[labels_key])
            splits += [split] * len(data)
    return ArraySource(variant, str(base.resolve()), classes, np.concatenate(images), np.asarray(labels), splits)


def open_source(spec: str, *, content_hash: bool = False) -> Source:
    """Open `digits`, `cifar10:ROOT`, `cifar100:ROOT`, an image folder or a CSV file."""
    if spec.lower() == "digits":
        return digits_source()
    prefix, _, rest = spec.partition(":")
    if prefix.lower() in ("cifar10", "cifar100") and rest:
        return cifar_source(Path(rest).expanduser(), prefix.lower())
    path = Path(spec).expanduser()
    if path.is_dir():
        return ImageFolderSource(path.resolve(), content_hash=content_hash)
    if path.is_file() and path.suffix.lower() == ".csv":
        return CsvSource(path.resolve(), content_hash=content_hash)
    if path.exists():
        raise SourceError(f"{spec} is neither a folder nor a .csv file; pass an image folder, a CSV, digits or cifar10:ROOT")
    raise SourceError(f"dataset not found: {spec}; pass an image folder, a CSV file, digits, or cifar10:ROOT")
