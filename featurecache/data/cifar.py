"""CIFAR-10 and CIFAR-100 from their python batches on disk: read as arrays, never downloaded,
with a pickle loader that accepts only what a dict of NumPy arrays needs."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from ..errors import SourceError
from .sources import CIFAR_VARIANTS, ArraySource


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


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def cifar_base(root: Path, variant: str) -> Path:
    folder = CIFAR_VARIANTS[variant]
    return root if (root / ("batches.meta" if variant == "cifar10" else "meta")).exists() else root / folder


def cifar_source(root: Path, variant: str) -> ArraySource:
    """CIFAR-10 or CIFAR-100 (fine or coarse labels) from the python batches under `root`.

    Never downloaded. Rows are named by the batches' own `filenames` and indexed by their
    position in their split (train 0..49,999, test 0..9,999); class names are decoded
    whether the pickles hold them as bytes or str.
    """
    folder = CIFAR_VARIANTS[variant]
    base = cifar_base(root, variant)
    if variant == "cifar10":
        parts, meta, names_key, labels_key = ([f"data_batch_{i}" for i in range(1, 6)], "test_batch"), "batches.meta", "label_names", "labels"
    else:
        fine = variant == "cifar100"
        parts, meta = (["train"], "test"), "meta"
        names_key, labels_key = ("fine_label_names", "fine_labels") if fine else ("coarse_label_names", "coarse_labels")
    if not (base / meta).exists():
        raise SourceError(
            f"{variant} not found under {root} (expected {folder}/ with the python batches: "
            f"{', '.join([*parts[0], parts[1], meta])}); download it on a connected machine and pass "
            f"{variant}:/path/to/its/parent"
        )
    classes = [_text(n) for n in _load_batch(base / meta)[names_key]]
    images, labels, splits, names, indices = [], [], [], [], []
    for split, files in (("train", parts[0]), ("test", [parts[1]])):
        position = 0
        for file in files:
            if not (base / file).exists():
                raise SourceError(f"{variant} under {root} is incomplete: {base / file} is missing (expected "
                                  f"{folder}/ with {', '.join([*parts[0], parts[1], meta])})")
            batch = _load_batch(base / file)
            if "data" not in batch or labels_key not in batch:
                raise SourceError(f"CIFAR batch {base / file} has no {'data' if 'data' not in batch else labels_key}")
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            own = [_text(n) for n in batch.get("filenames", [])]
            images.append(data)
            labels += list(batch[labels_key])
            splits += [split] * len(data)
            for i in range(len(data)):
                names.append(f"{split}/{own[i]}" if len(own) == len(data) else f"{split}/{position + i:05d}")
                indices.append(position + i)
            position += len(data)
    if len(set(names)) != len(names):  # filenames not unique: fall back to positions
        names = [f"{split}/{index:05d}" for split, index in zip(splits, indices)]
    source = ArraySource(variant, str(base.resolve()), classes, np.concatenate(images), np.asarray(labels), splits,
                         names=names, indices=indices)
    source.identity_extra = {"rows": "filenames, per-split index"}
    return source
