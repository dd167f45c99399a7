"""Hugging Face datasets: a `datasets.Dataset`/`DatasetDict` from Python, or `hf:PATH`.

`hf:PATH` reads, never downloading:

- a dataset saved with `save_to_disk`: a `Dataset` (PATH/state.json) or a
  `DatasetDict` (PATH/dataset_dict.json), memory-mapped where it lies;
- a folder of parquet files as a Hub dataset repository holds them
  (`PATH/train-*.parquet`, `PATH/data/train-00000-of-00001.parquet`,
  `PATH/data/train/*.parquet`). Each file's split is the first split word in its path,
  read from the file name up (train; validation, valid, val, dev; test, testing, eval);
  every file is `train` when none names a split. `datasets` converts the files to its
  Arrow cache (HF_DATASETS_CACHE) once, as `load_dataset` would.

Columns: the image column is the one `Image` feature, the label column the one
`ClassLabel` (else an integer column named `label` or `labels`); class names come from
the ClassLabel. `hf:PATH?image=img&label=fine_label` names them (from Python:
`extract(source=ds, image_column="img", label_column="fine_label")`). A split without
the label column, or whose labels are all -1 (Hugging Face's "no label"), is an
unlabeled split. `validation` is featurecache's `val`.

Rows are `<split>/<row:06d>`, indexed by their row. A row whose image is a file on disk
(a path and no bytes) is fingerprinted by stat; every other by a hash of its encoded
bytes ("content" in `featurecache info`). Each image's header is read while listing, so
bytes that are no image are refused before any work. `datasets` is imported only here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import SourceError
from .images import load_rgb, load_rgb_bytes
from .sources import (SPLIT_ALIASES, UNLABELED, Sample, Source, _file_fingerprint, _fingerprint, split_sort_key)

HF_LAYOUT = ("a dataset saved with save_to_disk (PATH/dataset_dict.json or PATH/state.json), or parquet files as a "
             "Hub dataset repository holds them (PATH/train-*.parquet, PATH/data/train-00000-of-00001.parquet)")
OPTIONS = ("image", "label")
SPLIT_WORDS = {**SPLIT_ALIASES, "dev": "val", "eval": "test", "evaluation": "test"}
LABEL_NAMES = ("label", "labels")
_ROWS_PER_READ = 512


def _split_name(split: object) -> str:
    """A featurecache split for a Hugging Face split name ("validation" -> val, "train[:10%]" -> train)."""
    text = str(split).lower()
    word = re.match(r"[a-z0-9_-]*", text).group(0)
    return SPLIT_WORDS.get(word, word) if word else "train"


@contextlib.contextmanager
def _datasets():
    """`datasets`, offline and without progress bars while featurecache reads through it."""
    try:
        import datasets
    except ImportError:
        raise SourceError('Hugging Face sources need the datasets package: pip install "featurecache[hf]" '
                          '(or pip install "datasets>=2.14")') from None
    offline = datasets.config.HF_HUB_OFFLINE, getattr(datasets.config, "HF_DATASETS_OFFLINE", None)
    bars = datasets.are_progress_bars_disabled()
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = offline
        if not bars:
            datasets.enable_progress_bars()


# ----------------------------------------------------------------------------- columns

def _is_image(feature) -> bool:
    """An `Image` feature, or the {bytes, path} struct it is stored as (parquet without HF metadata)."""
    if type(feature).__name__ == "Image":
        return True
    return isinstance(feature, Mapping) and set(feature) == {"bytes", "path"}


def _is_binary(feature) -> bool:
    return type(feature).__name__ == "Value" and feature.dtype in ("binary", "large_binary")


def _kind(feature) -> str:
    if type(feature).__name__ == "Value":
        return f"{feature.dtype} values"
    return type(feature).__name__ if not isinstance(feature, Mapping) else "a struct"


def _columns(parts: Mapping) -> str:
    features = {}
    for dataset in parts.values():
        features.update(dataset.features)
    return ", ".join(f"{name} ({_kind(feature)})" for name, feature in features.items())


def _image_column(parts: Mapping, named: str | None, where: str) -> str:
    if named:
        for split, dataset in parts.items():
            if named not in dataset.features:
                raise SourceError(f"{where}: the {split} split has no column {named!r}; its columns are "
                                  f"{_columns({split: dataset})}")
            feature = dataset.features[named]
            if not (_is_image(feature) or _is_binary(feature)):
                raise SourceError(f"{where}: column {named!r} holds {_kind(feature)}, not images; name the column "
                                  "holding images (an Image feature, or encoded image bytes) with image=COLUMN")
        return named
    found = sorted({name for dataset in parts.values() for name, feature in dataset.features.items()
                    if _is_image(feature)})
    if not found:
        raise SourceError(f"{where}: no image column (no column has the Image feature); the columns are "
                          f"{_columns(parts)}; name the one holding encoded images with image=COLUMN")
    if len(found) > 1:
        raise SourceError(f"{where}: several image columns ({', '.join(found)}); choose one with image=COLUMN "
                          f"(e.g. image={found[0]})")
    for split, dataset in parts.items():
        if found[0] not in dataset.features:
            raise SourceError(f"{where}: the {split} split has no image column {found[0]!r}")
    return found[0]


def _label_feature_problem(name: str, feature) -> str | None:
    """Why `feature` cannot be a label column, or None when it can (ClassLabel, integers)."""
    if type(feature).__name__ == "ClassLabel":
        return None
    if type(feature).__name__ == "Value" and re.fullmatch(r"u?int(8|16|32|64)", feature.dtype):
        return None
    if type(feature).__name__ == "Value" and feature.dtype in ("string", "large_string"):
        return (f"label column {name!r} holds strings, not class ids; encode it first: "
                f"dataset = dataset.class_encode_column({name!r}) (then save_to_disk for hf:PATH), "
                "or name a ClassLabel or integer column with label=COLUMN")
    return (f"label column {name!r} holds {_kind(feature)}, not class ids; name a ClassLabel or integer column "
            "with label=COLUMN")


def _label_column(parts: Mapping, named: str | None, image: str, where: str) -> tuple[str, list[str] | None]:
    """The label column and its class names (None: integer labels, named by number)."""
    if named:
        if not any(named in dataset.features for dataset in parts.values()):
            raise SourceError(f"{where}: no column {named!r}; the columns are {_columns(parts)}")
        column = named
    else:
        found = sorted({name for dataset in parts.values() for name, feature in dataset.features.items()
                        if type(feature).__name__ == "ClassLabel"})
        if len(found) > 1:
            raise SourceError(f"{where}: several ClassLabel columns ({', '.join(found)}); choose one with "
                              f"label=COLUMN (e.g. label={found[0]})")
        plain = [name for name in LABEL_NAMES if any(name in dataset.features for dataset in parts.values())]
        if not found and not plain:
            raise SourceError(f"{where}: no label column (no ClassLabel column, no column named label); the "
                              f"columns are {_columns(parts)}; name it with label=COLUMN")
        column = found[0] if found else plain[0]
    if column == image:
        raise SourceError(f"{where}: {column!r} cannot be both the image and the label column")
    names = None
    for dataset in parts.values():
        if column not in dataset.features:
            continue
        feature = dataset.features[column]
        if problem := _label_feature_problem(column, feature):
            raise SourceError(f"{where}: {problem}")
        if type(feature).__name__ == "ClassLabel":
            if names is not None and list(feature.names) != names:
                raise SourceError(f"{where}: the splits' ClassLabel {column!r} name different classes; give every "
                                  "split the same ClassLabel (dataset.cast_column)")
            names = list(feature.names)
    return column, names


# ----------------------------------------------------------------------------- the source

class HfSource(Source):
    """Rows of Hugging Face datasets by split: an image column, a label column."""

    def __init__(self, name: str, root: str, parts: Mapping, *, kind: str, where: str, image: str | None = None,
                 label: str | None = None, content_hash: bool = False) -> None:
        self.kind = kind
        renamed: dict[str, object] = {}
        for split, dataset in parts.items():
            ours = _split_name(split)
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", ours):
                raise SourceError(f"{where}: split {str(split)!r} is not a plain name (letters, digits, '_' or '-'); "
                                  "shard files are named after it; rename it")
            if ours in renamed:
                raise SourceError(f"{where}: two splits are both featurecache's {ours!r}; keep one of them")
            renamed[ours] = dataset
        parts = dict(sorted(renamed.items(), key=lambda item: split_sort_key(item[0])))
        if not any(len(dataset) for dataset in parts.values()):
            raise SourceError(f"{where}: the dataset has no rows")
        self.image_column = _image_column(parts, image, where)
        self.label_column, names = _label_column(parts, label, self.image_column, where)
        labels = {split: self._labels(dataset, where, split) for split, dataset in parts.items()}
        top = max((int(values.max(initial=-1)) for values in labels.values()), default=-1)
        classes = names if names is not None else [str(i) for i in range(top + 1)]
        if top >= len(classes):
            raise SourceError(f"{where}: label {top} but the ClassLabel {self.label_column!r} has {len(classes)} "
                              "classes")
        with _datasets() as datasets:
            # Bytes and paths, never decoded pixels: listing reads no image beyond its header.
            self.parts = {split: self._raw(dataset, datasets) for split, dataset in parts.items()}
        samples: list[Sample] = []
        self._files: set[str] = set()
        for split, dataset in self.parts.items():
            for i, value in enumerate(self._images(dataset)):
                label = int(labels[split][i])
                path = f"{split}/{i:06d}"
                class_name = classes[label] if label != UNLABELED else ""
                fingerprint = self._fingerprint(value, path, class_name, split, i, where, content_hash)
                samples.append(Sample(path, label, split, fingerprint, i))
        super().__init__(name, root, classes, samples)
        self._fingerprint_kind = "stat" if len(self._files) == len(samples) and not content_hash else "content"
        self._position = {s.path: (s.split, s.index) for s in samples}

    def _labels(self, dataset, where: str, split: str) -> np.ndarray:
        if self.label_column not in dataset.features:
            return np.full(len(dataset), UNLABELED, dtype=np.int64)
        column = dataset.with_format("arrow")[self.label_column]
        values = np.asarray(column.fill_null(UNLABELED).to_numpy(zero_copy_only=False), dtype=np.int64).reshape(-1)
        if (values < UNLABELED).any():
            raise SourceError(f"{where}: the {split} split has label {int(values.min())} in {self.label_column!r}; "
                              "labels are class ids from 0 (-1: no label)")
        if len(values) and (values == UNLABELED).all():
            values[:] = UNLABELED  # the whole split is unlabelled
        return values

    def _raw(self, dataset, datasets):
        dataset = dataset.select_columns([self.image_column])
        if type(dataset.features[self.image_column]).__name__ == "Image":
            dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        return dataset

    def _images(self, dataset):
        """Each row's image as (bytes or None, path or None), read in blocks of rows."""
        table = dataset.with_format("arrow")
        for start in range(0, len(dataset), _ROWS_PER_READ):
            for value in table[start:start + _ROWS_PER_READ][self.image_column].to_pylist():
                yield (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)

    def _fingerprint(self, value, path: str, class_name: str, split: str, row: int, where: str,
                     content_hash: bool) -> str:
        data, file = value
        if data is None and file:
            if self.kind == "hf" and not Path(file).is_absolute():
                raise SourceError(f"{where}: {split} row {row} names its image by the relative path {file!r}, which "
                                  "would be read from whatever folder featurecache runs in, not from the dataset's; "
                                  "store absolute paths or the image bytes in the dataset")
            self._files.add(path)
            return _file_fingerprint(Path(file), f"{path}\0{file}", class_name, split, content_hash)
        if not data:
            raise SourceError(f"{where}: {split} row {row} has no image in "
                              f"{self.image_column!r}; drop such rows (dataset.filter) first")
        try:
            with Image.open(io.BytesIO(data)):  # the header only: is it an image at all?
                pass
        except Exception as error:
            raise SourceError(f"{where}: {split} row {row} of {self.image_column!r} is not "
                              f"an image Pillow can read ({type(error).__name__}: {str(error)[:80]}); fix or drop it "
                              "(dataset.filter), or name the image column with image=COLUMN") from None
        return _fingerprint(path, hashlib.sha256(data).hexdigest(), class_name, split)

    def identity(self) -> dict:
        return {**super().identity(), "columns": {"image": self.image_column, "label": self.label_column},
                "splits": {split: len(dataset) for split, dataset in self.parts.items()}}

    def _encoded(self, sample: Sample) -> tuple[object, object]:
        """A row's image as (encoded bytes, file path); either may be None."""
        split, i = self._position[sample.path]
        value = self.parts[split][i][self.image_column]
        return (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)

    def load(self, sample: Sample) -> Image.Image:
        data, file = self._encoded(sample)
        if data is None and file:
            return load_rgb(file)
        return load_rgb_bytes(data, sample.path)

    def content(self, sample: Sample) -> Path | bytes | None:
        data, file = self._encoded(sample)
        if isinstance(data, bytes):
            return data
        return Path(file) if isinstance(file, str) and file else None


# ----------------------------------------------------------------------------- from Python

def from_huggingface(obj: object, *, name: str | None = None, image: str | None = None,
                     label: str | None = None) -> HfSource:
    """A source for a `datasets.Dataset`, a `DatasetDict`, or a dict of Datasets by split."""
    kinds = {type(value).__name__ for value in (obj.values() if isinstance(obj, Mapping) else [obj])}
    if any(kind.startswith("Iterable") for kind in kinds):
        raise SourceError("a streaming (Iterable) Hugging Face dataset cannot be listed ahead; load it without "
                          "streaming=True, or save it with save_to_disk and pass hf:PATH")
    parts = dict(obj) if isinstance(obj, Mapping) else {obj.split or "train": obj}
    if not parts:
        raise SourceError("the DatasetDict has no splits")
    first = next(iter(parts.values()))
    name = name or getattr(first.info, "dataset_name", None) or getattr(first.info, "builder_name", None) or "hf"
    return HfSource(name, name, parts, kind="python:hf", where="the Hugging Face dataset", image=image, label=label)


# ----------------------------------------------------------------------------- hf:PATH

def parse_spec(rest: str) -> tuple[str, dict[str, str]]:
    """`PATH?image=img&label=y` -> (PATH, {"image": "img", "label": "y"})."""
    path, mark, query = rest.rpartition("?")
    if not mark or not re.fullmatch(r"\w+=[^&=]*(&\w+=[^&=]*)*", query):
        return rest, {}
    options = dict(pair.split("=", 1) for pair in query.split("&"))
    if unknown := sorted(set(options) - set(OPTIONS)):
        raise SourceError(f"hf:{rest}: unknown option {unknown[0]!r}; hf: takes image=COLUMN and label=COLUMN "
                          f"(e.g. hf:{path}?image=img&label=fine_label)")
    if empty := [key for key, value in options.items() if not value]:
        raise SourceError(f"hf:{rest}: {empty[0]}= names no column")
    return path, options


def _parquet_splits(root: Path) -> dict[str, list[Path]]:
    files = sorted(p for p in root.rglob("*.parquet")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    found: dict[Path, str | None] = {}
    configs: dict[tuple[str, ...], Path] = {}
    for file in files:
        *folders, stem = file.relative_to(root).with_suffix("").parts
        split, config = None, []
        for position, part in reversed(list(enumerate([*folders, stem]))):
            words = [SPLIT_WORDS[w] for w in re.split(r"[^a-z0-9]+", part.lower()) if w in SPLIT_WORDS]
            if words and split is None:
                split = words[0]
            elif position < len(folders):
                config.insert(0, part)  # a folder that names no split: a configuration's folder (data/, ...)
        found[file] = split
        configs.setdefault(tuple(config), file)
    if len(configs) > 1:
        folders = sorted("/".join(key) or "." for key in configs)
        raise SourceError(f"hf:{root}: parquet files in several folders that name no split ({', '.join(folders)}): "
                          f"several configurations? point hf: at one, e.g. hf:{root / folders[-1]}")
    if all(split is None for split in found.values()):
        return {"train": files} if files else {}
    if unnamed := [file for file, split in found.items() if split is None]:
        raise SourceError(f"hf:{root}: cannot tell the split of {unnamed[0].relative_to(root)}; name its split in "
                          "its file or folder name (train-*, validation-*, test-*), as the Hub does")
    splits: dict[str, list[Path]] = {}
    for file, split in found.items():
        splits.setdefault(split, []).append(file)
    return splits


def open_hf(rest: str, *, content_hash: bool = False, allow_layout: bool = False) -> HfSource:
    """`hf:PATH[?image=COLUMN&label=COLUMN]`: a dataset saved with save_to_disk, or a local parquet folder."""
    text, options = parse_spec(rest)
    if not text:
        raise SourceError("hf: give the dataset's local folder after the colon, e.g. hf:/data/cifar10")
    root = Path(text).expanduser()
    where = f"hf:{root}"
    if not root.exists():
        raise SourceError(f"{where}: no such folder; expected {HF_LAYOUT}")
    root = root.resolve()
    with _datasets() as datasets:
        if root.is_dir() and ((root / "dataset_dict.json").is_file() or (root / "state.json").is_file()):
            try:
                loaded = datasets.load_from_disk(str(root))
            except Exception as error:
                raise SourceError(f"{where}: cannot read the dataset saved there ({type(error).__name__}: "
                                  f"{str(error)[:120]}); save it again with save_to_disk") from None
            parts = dict(loaded) if isinstance(loaded, Mapping) else {loaded.split or "train": loaded}
        else:
            splits = {"train": [root]} if root.is_file() and root.suffix == ".parquet" else \
                _parquet_splits(root) if root.is_dir() else {}
            if not splits:
                raise SourceError(f"{where} is neither a dataset saved with save_to_disk (no dataset_dict.json or "
                                  f"state.json) nor a parquet folder (no *.parquet files); expected {HF_LAYOUT}")
            parts = {}
            for split, files in splits.items():
                try:
                    parts[split] = datasets.Dataset.from_parquet([str(f) for f in files], split=split)
                except Exception as error:
                    raise SourceError(f"{where}: cannot read the {split} parquet files ({files[0].name}, ...): "
                                      f"{type(error).__name__}: {str(error)[:120]}") from None
    source = HfSource(root.name, str(root), parts, kind="hf", where=where, image=options.get("image"),
                      label=options.get("label"), content_hash=content_hash)
    if not allow_layout:  # one class, a class only in val/test, Dog/dog: as for a folder or a CSV
        from .layout_checks import check_classes

        check_classes(where, source.classes, source.samples)
    return source
