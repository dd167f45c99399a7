"""Resolve a `--weights` value to a state dict, its SHA-256 and its preprocessing.

Accepted values: `imagenet` (torchvision's IMAGENET1K_V1 for the model), a weights enum
name such as `IMAGENET1K_V2`, `random` (seeded initialisation), or a path to a `.pt`/
`.pth` state dict (loaded with `weights_only=True`, never unpickled freely) or a
`.safetensors` file. We default to V1 rather than V2: Kornblith et al. (2019, "Do
Better ImageNet Models Transfer Better?") found that the regularisers in the V2
training recipe (label smoothing, heavy augmentation) make frozen features transfer
worse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .registry import BackboneEntry, Preprocessing, backbone_state_dict
from ..errors import (BackboneError, CacheNotFoundError, CorruptCacheError, UnsafeCheckpointError,
                     StorageError, WeightsUnavailableError)
from ..cache.atomic import remove_stale_temporaries, storage_error, write_atomic
from ..cache.integrity import read_safetensors, write_safetensors
from ..cache.layout import weights_file

log = logging.getLogger("featurecache")

DEFAULT_PRETRAINED = "IMAGENET1K_V1"
#: Set to 1 to forbid any download attempt (tests and air-gapped machines).
OFFLINE_ENV = "FEATURECACHE_OFFLINE"
PREPROCESSING_METADATA = "featurecache.preprocessing"
ARCH_METADATA = "featurecache.arch"


@dataclass(frozen=True)
class ResolvedWeights:
    """A backbone state dict plus what identifies it."""

    state_dict: dict[str, torch.Tensor]
    sha256: str
    description: str  # e.g. "IMAGENET1K_V1", "random(seed=0)", "file:/x/y.pt"
    preprocessing: Preprocessing


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of the tensors themselves (names, dtypes, shapes, bytes), not of a file."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def resolve_weights(entry: BackboneEntry, weights: str, *, seed: int = 0) -> ResolvedWeights:
    """Turn a `--weights` value into tensors; raises a BackboneError subclass on failure."""
    value = weights.strip()
    if value.lower() == "random":
        torch.manual_seed(seed)
        state = backbone_state_dict(entry.build(), entry.description)
        return _resolved(entry, state, f"random(seed={seed})", entry.preprocessing)
    if value.lower() in ("imagenet", "pretrained", "default"):
        if entry.pretrained is not None:  # e.g. timm: the local hub cache, never a download
            path, tag = entry.pretrained()
            state, _ = load_checkpoint(path)
            check_architecture(entry, state, path)
            return _resolved(entry, state, f"pretrained:{tag}", entry.preprocessing)
        value = DEFAULT_PRETRAINED
    if not value:
        raise BackboneError("--weights is empty; use imagenet, random, an enum name or a path to a checkpoint")
    path = Path(value).expanduser()
    if path.suffix.lower() in (".pt", ".pth", ".bin", ".safetensors") or path.exists():
        state, preprocessing = load_checkpoint(path)
        check_architecture(entry, state, path)
        return _resolved(entry, state, f"file:{path.resolve()}", preprocessing or entry.preprocessing)
    return _resolve_enum(entry, value)


def check_architecture(entry: BackboneEntry, state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a checkpoint that does not fit `entry`, naming the model it was saved from."""
    from .registry import available_backbones, get_backbone, state_fits

    if state_fits(entry, state):
        return
    saved = _saved_arch(path)
    if saved is None:
        saved = next((name for name in available_backbones() if name != entry.name
                      and state_fits(get_backbone(name), state)), None)
    origin = f"it was saved from {saved}" if saved else "it matches none of: " + ", ".join(available_backbones())
    hint = f"; pass --model {saved}" if saved else ""
    raise BackboneError(f"the checkpoint {path} does not fit --model {entry.name}: {origin}{hint}")


def _saved_arch(path: Path) -> str | None:
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(ARCH_METADATA)
    except (SafetensorError, OSError, ValueError):
        return None


def _resolved(entry: BackboneEntry, state: dict[str, torch.Tensor], description: str,
              preprocessing: Preprocessing) -> ResolvedWeights:
    state = entry.description.backbone_state(state)
    return ResolvedWeights(state, weights_sha256(state), description, preprocessing)


def _resolve_enum(entry: BackboneEntry, name: str) -> ResolvedWeights:
    enum = entry.weights_enum
    choices = [w.name for w in enum] if enum is not None else []
    if name.upper() not in choices:
        raise BackboneError(
            f"unknown weights {name!r} for {entry.name}; use imagenet, random, a path to a "
            f"state dict (.pt/.pth/.safetensors)" + (f", or one of: {', '.join(choices)}" if choices else "")
        )
    member = enum[name.upper()]
    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(member.url)
    if not file.exists():
        _download(member.url, file, entry.name, member.name)
    state, _ = load_checkpoint(file)
    transforms = member.transforms()
    preprocessing = Preprocessing(
        resize_size=int(transforms.resize_size[0]),
        crop_size=int(transforms.crop_size[0]),
        interpolation=transforms.interpolation.value,
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
    )
    return _resolved(entry, state, member.name, preprocessing)


def _download(url: str, destination: Path, arch: str, weights_name: str) -> None:
    advice = (
        f"{arch} {weights_name} weights are not on this machine ({destination}). "
        f"On a connected machine download {url} and copy it to that path, "
        f"or pass --weights /path/to/the/file.pth; to try the tool without them, pass --weights random "
        f"(random features: everything runs, accuracy is a random-feature baseline)"
    )
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise WeightsUnavailableError(advice + f" ({OFFLINE_ENV} is set, so no download was tried)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", url)

    def fetch(tmp: Path) -> None:
        try:
            with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            raise WeightsUnavailableError(f"{advice} (download failed: {error})") from None

    try:
        write_atomic(destination, fetch, "the downloaded weights")
    except StorageError as error:
        raise WeightsUnavailableError(f"{advice} ({error})") from None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], Preprocessing | None]:
    """Load tensors from a .safetensors or a .pt/.pth file, never running pickled code."""
    if not path.exists():
        raise BackboneError(f"weights file not found: {path}; pass imagenet, random or an existing file")
    if path.is_dir():
        raise BackboneError(f"--weights {path} is a directory; pass a .pt/.pth/.safetensors file")
    preprocessing = None
    if path.suffix.lower() == ".safetensors":
        try:  # a file featurecache wrote (finetune/<run>/backbone.safetensors) is checked against its checksum
            state, metadata = read_safetensors(path, "weights file", "pass another --weights", required=False)
        except CorruptCacheError as error:
            raise BackboneError(str(error)) from None
        if PREPROCESSING_METADATA in metadata:
            try:
                preprocessing = Preprocessing.from_dict(json.loads(metadata[PREPROCESSING_METADATA]))
                check_preprocessing(preprocessing)
            except (ValueError, TypeError, KeyError, BackboneError, CorruptCacheError) as error:
                raise BackboneError(f"weights file {path}: its {PREPROCESSING_METADATA} metadata is not valid "
                                    f"({str(error)[:160]}); pass another --weights") from None
        return _plain_state_dict(state, path), preprocessing
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refused to load {path}: it holds Python objects, not just tensors "
            f"({str(error).splitlines()[0][:160]}). Re-save it as a plain state dict or .safetensors"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise BackboneError(f"cannot read checkpoint {path}: {str(error).splitlines()[0][:200]}") from None
    return _plain_state_dict(loaded, path), preprocessing


def check_preprocessing(preprocessing: Preprocessing) -> None:
    """Refuse sizes, statistics or interpolations that no image pipeline can use."""
    from ..cache.schema import PreprocessingRecord, check

    check(PreprocessingRecord, preprocessing.to_dict(), "preprocessing", "pass another --weights")


def _plain_state_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    # Training scripts often nest the weights ({"state_dict": ...}) or prefix them
    # with "module." (DataParallel) or "backbone."; accept those common shapes.
    if isinstance(loaded, dict):
        for key in ("state_dict", "model", "backbone"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise BackboneError(f"{path} is not a state dict of tensors")
    state = {}
    for key, tensor in loaded.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = tensor
    return state


def store_weights(weights_dir: Path, arch: str, resolved: ResolvedWeights) -> Path:
    """Write the checkpoint as `<sha256>.safetensors` (atomically, sealed) and return its path.

    A file already there is kept only if its tensors still hash to its name: a missing or
    damaged checkpoint is rewritten from the resolved weights."""
    destination = weights_dir / weights_file(resolved.sha256)
    try:
        weights_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise storage_error(error, weights_dir, "the weights folder") from None
    if destination.exists():
        try:
            read_checkpoint(weights_dir, resolved.sha256)
            return destination
        except (BackboneError, CorruptCacheError) as error:
            log.warning("rewriting the damaged backbone checkpoint %s (%s)", destination, error)
    remove_stale_temporaries(weights_dir)
    metadata = {ARCH_METADATA: arch, PREPROCESSING_METADATA: json.dumps(resolved.preprocessing.to_dict())}
    write_safetensors(destination, resolved.state_dict, metadata, "the backbone checkpoint")
    return destination


def checkpoint_path(weights_dir: Path, sha256: str) -> Path:
    return weights_dir / weights_file(sha256)


def read_checkpoint(weights_dir: Path, sha256: str) -> dict[str, torch.Tensor]:
    """The tensors of `_weights/<sha256>.safetensors`, checked: they must hash to the name.

    CacheNotFoundError when missing, CorruptCacheError when damaged, both saying what to do."""
    path = checkpoint_path(weights_dir, sha256)
    advice = "run featurecache verify --repair on the entry, or extract the dataset again, to restore it"
    if not path.is_file():
        raise CacheNotFoundError(f"the backbone checkpoint {path} is missing; {advice}")
    try:
        state, _ = read_safetensors(path, "the backbone checkpoint", advice, required=False)
    except FileNotFoundError:
        raise CacheNotFoundError(f"the backbone checkpoint {path} is missing; {advice}") from None
    if weights_sha256(state) != sha256:
        raise CorruptCacheError(f"the backbone checkpoint {path} is damaged (its tensors do not hash to its "
                                f"name); {advice}")
    return state
