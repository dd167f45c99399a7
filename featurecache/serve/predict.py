"""Predict on new images with a cache's own backbone checkpoint, preprocessing and a head.

A `Predictor` is a whole image classifier: the backbone rebuilt from the checkpoint the
cache was made with (no network), the cache's preprocessing, and a head module mapping
tap features to class probabilities. `export` turns the same thing into TorchScript.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backbones.registry import Preprocessing, StagedBackbone, build_network, get_backbone, staged_backbone
from ..errors import CacheNotFoundError, HeadError, SourceError
from ..cache.schema import CROSS_ENSEMBLE
from ..fit.cross_ensemble import cross_split_probabilities, load_cross_ensemble
from ..fit.headstore import load_head, read_record
from ..heads.metrics import not_distributions
from ..heads.probabilities_module import ProbabilitiesModule
from ..data.images import ImageDecodeError, load_rgb
from ..backbones.preprocess import normalize_batch, prepare_image
from ..data.sources import image_files_under, printable_path, warn_unlisted
from ..cache.layout import WEIGHTS_DIR
from ..cache.store import Cache, open_cache
from ..backbones.weights import read_checkpoint


def cache_backbone(cache: Cache) -> tuple[StagedBackbone, Preprocessing]:
    """The frozen backbone a cache was extracted with, rebuilt from `_weights/<sha>.safetensors`
    (checked: its tensors must hash to the sha256 the manifest records)."""
    state = read_checkpoint(cache.path.parent / WEIGHTS_DIR, cache.manifest["weights"]["sha256"])
    entry = get_backbone(cache.manifest["config"]["arch"])
    model = staged_backbone(entry, build_network(entry, state)).eval()
    return model, Preprocessing.from_dict(cache.manifest["config"]["preprocessing"])


@dataclass
class Predictor:
    """Images -> probabilities, with everything needed to reproduce the cache's features."""

    backbone: StagedBackbone
    preprocessing: Preprocessing
    tap: str
    head: nn.Module  # tap features (B, D) -> probabilities (B, C)
    classes: list[str]
    storage_dtype: str = "float32"  # features are rounded like the cache's, so heads see the same inputs
    # How the entry's extract decoded its files (see `file_decoding`): libjpeg draft scale, and
    # "pil" or "torch" (torchvision decode and tensor resize; "torch-pixels": PIL decode, tensor resize).
    draft_size: tuple[int, int] | None = None
    decode: str = "pil"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, S, S), already resized and cropped -> flat tap features."""
        with torch.inference_mode():
            x = normalize_batch(images, self.preprocessing)
            values = self.backbone(x, (self.tap,))[self.tap].float().flatten(1)
            return values.to(getattr(torch, self.storage_dtype)).float()

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.head(self.features(images)).float().numpy()

    def prepare(self, image) -> torch.Tensor:
        """A decoded RGB image, resized and cropped as this backbone's cache was."""
        return prepare_image(image, self.preprocessing)

    def prepare_file(self, path: str | os.PathLike) -> torch.Tensor:
        """An image file decoded, resized and cropped as the entry's extract did (its `--draft`, its
        `--decode`); raises ImageDecodeError for a file that cannot be read."""
        if self.decode == "pil":
            return self.prepare(load_rgb(path, draft_size=self.draft_size))
        from ..backbones import tensor_decode

        item = tensor_decode.read_encoded(path) if self.decode == "torch" else tensor_decode.pixels(load_rgb(path))
        return tensor_decode.resize_crop(tensor_decode.decode_one(item), self.preprocessing)

    def predict_prepared(self, prepared: list[torch.Tensor]) -> np.ndarray:
        return self.predict_proba(torch.stack(prepared))


@dataclass
class CrossPredictor:
    """A soft vote across cache entries: each member's own backbone, preprocessing and head, averaged."""

    members: list[Predictor]
    weights: list[float]  # normalised, one per member
    labels: list[str]  # ENTRY:HEAD, one per member
    classes: list[str]

    def prepare_file(self, path: str | os.PathLike) -> tuple[torch.Tensor, ...]:
        return tuple(member.prepare_file(path) for member in self.members)

    def predict_prepared(self, prepared: list[tuple[torch.Tensor, ...]]) -> np.ndarray:
        parts = [weight * member.predict_prepared([item[index] for item in prepared])
                 for index, (member, weight) in enumerate(zip(self.members, self.weights))]
        return sum(parts[1:], parts[0])


def _head_module(head) -> nn.Module:
    """The head as a module: its own, or its predict_proba where it has none."""
    try:
        return head.as_module().eval()
    except HeadError as error:
        if getattr(head, "exportable_", True):  # not the no-module case: a real error
            raise
        return ProbabilitiesModule(head, str(error))


# Sources whose rows extract reads as files (data/sources.py FileSource and its subclasses): only
# these get `--draft`, and `--decode torch` hands their bytes to torchvision; the others' images are
# decoded by PIL (a Hugging Face dataset's bytes, a Python dataset's files or arrays), then resized.
FILE_SOURCE_KINDS = frozenset({"imagefolder", "csv", "tinyimagenet", "food101"})


def file_decoding(cache: Cache) -> tuple[tuple[int, int] | None, str]:
    """(draft_size, decode) that reproduce the entry's extract on an image file: what
    extract/stage.py and extract/engine.py applied for the entry's recorded `jpeg_draft` and `decode`
    (entries made before extract recorded `jpeg_draft` only where it applied hold it for any source)."""
    recorded = cache.manifest["config"]["preprocessing"]
    files = cache.manifest["config"]["source"]["kind"] in FILE_SOURCE_KINDS
    if recorded.get("decode", "pil") == "torch":
        return None, "torch" if files else "torch-pixels"
    resize = int(recorded["resize_size"])
    return ((resize, resize) if recorded.get("jpeg_draft") and files else None), "pil"


def _predictor(cache: Cache, head, record: dict) -> Predictor:
    backbone, preprocessing = cache_backbone(cache)
    draft_size, decode = file_decoding(cache)
    return Predictor(backbone.to(memory_format=torch.channels_last), preprocessing, record["tap"],
                     _head_module(head), cache.classes, cache.manifest["dtype"], draft_size, decode)


def load_predictor(cache: Cache | str | Path, head_name: str) -> Predictor | CrossPredictor:
    """The cache's backbone plus one of its fitted heads; for an ensemble across entries, each member's."""
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    if read_record(cache, head_name)["head"] == CROSS_ENSEMBLE:
        _, voters, weights = load_cross_ensemble(cache, head_name)
        members = [_predictor(member.cache, head, {"tap": tap}) for member, head, tap in voters]
        return CrossPredictor(members, weights.tolist(), [member.label for member, _, _ in voters], cache.classes)
    head, record = load_head(cache, head_name)
    return _predictor(cache, head, record)


def image_files(paths: list[str | Path]) -> list[Path]:
    """Files as given, and the image files inside any folder given, listed as extract lists a
    class folder (`image_files_under`: hidden files and folders skipped, symlinked folders followed,
    a broken symlink kept, to be reported unreadable)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            unlisted: list[Path] = []
            files += image_files_under(path, unlisted)
            warn_unlisted(path, unlisted)
        elif path.exists() or os.path.islink(path):
            files.append(path)
        else:
            raise SourceError(f"no such image file or folder: {path}")
    if not files:
        raise SourceError("no image files found in the given paths")
    return files


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class, probability), best first; empty when there is an error
    error: str = ""  # why there is no prediction (an unreadable image, ...)


def _top(path: str, row: np.ndarray, classes: list[str], k: int) -> Prediction:
    """The `k` most probable classes of one row, best first (ties in class order); an error instead
    when the row is not a probability distribution (NaN would rank first, and a row summing to 2
    showed two classes at 1.000)."""
    if not_distributions(row[None])[0]:  # fit-head's test of a probability row
        if not np.isfinite(row).all():
            return Prediction(path, [], "no prediction: the model gave NaN or inf for this image")
        return Prediction(path, [], f"no prediction: the model's probabilities are not a distribution (they sum "
                                    f"to {float(row.sum(dtype=np.float64)):.4g}, the smallest is "
                                    f"{float(row.min()):.3g})")
    order = np.argsort(-row, kind="stable")[:k]
    return Prediction(path, [(classes[i], float(row[i])) for i in order])


def predict(predictor: Predictor | CrossPredictor, paths: list[str | Path], *, top_k: int = 5, batch_size: int = 32) -> list[Prediction]:
    """Classify image files (or folders of them); unreadable files get an error instead."""
    files = image_files(paths)
    k = max(1, min(top_k, len(predictor.classes)))
    results: list[tuple[int, Prediction]] = []
    for start in range(0, len(files), batch_size):
        chunk, tensors, good = files[start : start + batch_size], [], []
        for position, file in enumerate(chunk, start):
            shown = printable_path(str(file))  # a name that is not UTF-8 still prints
            try:
                tensors.append(predictor.prepare_file(file))
                good.append((position, shown))
            except ImageDecodeError as error:
                results.append((position, Prediction(shown, [], f"unreadable: {error.reason}")))
        if tensors:
            probabilities = predictor.predict_prepared(tensors)
            for (position, shown), row in zip(good, probabilities):
                results.append((position, _top(shown, row, predictor.classes, k)))
    return [prediction for _, prediction in sorted(results, key=lambda item: item[0])]


def predict_split(cache: Cache | str | Path, head_name: str, split: str, *, top_k: int = 5,
                  block_rows: int = 4096) -> list[Prediction]:
    """Classify the rows of a cached split (e.g. an unlabeled `test`) with a fitted head,
    straight from the cached features: no image is decoded, no backbone is run.

    The split is read one shard at a time, so memory holds one shard whatever its size.
    """
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    if split not in cache.splits:
        raise CacheNotFoundError(f"split {split!r} is not in {cache.path.name}; it has: {', '.join(cache.splits)}")
    if read_record(cache, head_name)["head"] == CROSS_ENSEMBLE:
        return _predict_cross_split(cache, head_name, split, top_k)
    head, record = load_head(cache, head_name)
    tap = record["tap"]
    k = max(1, min(top_k, len(cache.classes)))
    results: list[Prediction] = []
    for rows in cache.iter_shards(split, tap):
        features = rows.features[tap]
        for start in range(0, len(features), block_rows):
            block = features[start : start + block_rows]
            probabilities = np.asarray(head.predict_proba(block.reshape(len(block), -1).astype(np.float32)))
            results += [_top(path, row, cache.classes, k)
                        for path, row in zip(rows.paths[start : start + block_rows], probabilities)]
    return results


def _predict_cross_split(cache: Cache, head_name: str, split: str, top_k: int) -> list[Prediction]:
    """An ensemble across entries on a cached split, rows matched by path; a row some member's entry
    lacks gets an error instead of a vote of fewer members."""
    voted = cross_split_probabilities(cache, head_name, split)
    k = max(1, min(top_k, len(cache.classes)))
    by_path = {path: row for path, row in zip(voted.paths, voted.probabilities)}
    results, home = [], cache.paths(split)
    listed = set(home)
    for path in home + [p for p in voted.missing_from if p not in listed]:
        if path in by_path:
            results.append(_top(path, by_path[path], cache.classes, k))
        else:
            results.append(Prediction(path, [], f"not in {', '.join(voted.missing_from[path])}: left out of the vote"))
    return results
