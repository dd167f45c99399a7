"""A finetune run on disk: its resume checkpoint, its outputs, its record, and loading it for use.

`finetune/<name>/` holds `checkpoint.safetensors` (the trainable tensors, optimizer state and
settings, rewritten after each epoch), the best epoch so far as `backbone.safetensors` and
`head.safetensors` (each noting its epoch), and `finetune.json`, whose `complete` turns true
only when every epoch asked for is done. A run without that mark is unfinished: stopped, or
still running.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..backbones.registry import StagedBackbone
from ..backbones.weights import ARCH_METADATA, PREPROCESSING_METADATA
from ..cache.integrity import read_safetensors, read_sealed_json, write_safetensors
from ..cache.layout import BACKBONE_FILE, FINETUNE_DIR, FINETUNE_RECORD, HEAD_FILE
from ..cache.store import Cache, open_cache
from ..errors import CacheIncompleteError, CacheNotFoundError, CorruptCacheError, HeadError, MismatchError
from ..fit.headstore import check_head_name
from ..heads.registry import head_from_saved
from ..serve.predict import Predictor, cache_backbone, file_decoding
from .spec import finetune_command

STATE_METADATA = "featurecache.finetune"
HEAD_METADATA = "featurecache.head"


def network_state(backbone: StagedBackbone) -> dict[str, torch.Tensor]:
    """The backbone's state under the network's own names (classifier excluded), as `extract
    --weights` expects: the stages share the network's modules."""
    state = backbone.description.backbone_state(backbone.network.state_dict())
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def load_network_state(backbone: StagedBackbone, state: dict[str, torch.Tensor]) -> None:
    backbone.network.load_state_dict(backbone.description.backbone_state(state))


def write_output(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    write_safetensors(path, tensors, metadata, "the finetune output")


def read_output(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A finetune output or checkpoint, every checksum checked."""
    try:
        return read_safetensors(path, "finetune output", "run featurecache finetune again with --restart")
    except FileNotFoundError:
        raise CacheNotFoundError(f"the finetune output {path} is missing; run featurecache finetune again "
                                 "with --restart") from None


def save_checkpoint(path: Path, model, optimizer, scaler, state: dict) -> None:
    """Model + optimizer tensors in safetensors; epoch, step, history, groups in its JSON metadata."""
    tensors = {f"model.{k}": v for k, v in model.trainable_state().items()}
    optimizer_state = optimizer.state_dict()
    scalars = {}
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    state = {**state, "optimizer_groups": optimizer_state["param_groups"], "optimizer_scalars": scalars,
             "scaler": scaler.state_dict()}
    write_output(path, tensors, {STATE_METADATA: json.dumps(state)})


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a resume checkpoint, checked; `state["settings"]` says what it was made with."""
    tensors, metadata = read_output(path)
    return tensors, json.loads(metadata[STATE_METADATA])


def load_checkpoint(tensors: dict[str, torch.Tensor], state: dict, model, optimizer, scaler) -> None:
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
    optimizer_state: dict = {}
    for key, value in [*((k[len("optimizer."):], v) for k, v in tensors.items() if k.startswith("optimizer.")),
                       *state["optimizer_scalars"].items()]:
        index, name = key.split(".", 1)
        optimizer_state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} for g in state["optimizer_groups"]]
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})
    scaler.load_state_dict(state["scaler"])


def save_outputs(directory: Path, model, cache: Cache, head_config: dict, provenance: dict) -> None:
    """The model as the run's outputs; `provenance["epoch"]` goes into both files."""
    arch = cache.manifest["config"]["arch"]
    write_output(directory / BACKBONE_FILE, network_state(model.backbone), {
        ARCH_METADATA: arch, PREPROCESSING_METADATA: json.dumps(cache.manifest["config"]["preprocessing"]),
        STATE_METADATA: json.dumps(provenance)})
    head_state = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    write_output(directory / HEAD_FILE, head_state, {HEAD_METADATA: json.dumps({"config": head_config, **provenance})})


def load_outputs(directory: Path, model) -> None:
    load_network_state(model.backbone, read_output(directory / BACKBONE_FILE)[0])
    model.head.load_state_dict(read_output(directory / HEAD_FILE)[0])


def read_finetune_record(cache: Cache, name: str) -> dict:
    """`finetune/<name>/finetune.json`, checked; a folder without one is a run stopped (or still
    running) before its first record."""
    check_head_name(name, "finetune run")
    directory = cache.path / FINETUNE_DIR / name
    try:
        return read_sealed_json(directory / FINETUNE_RECORD, "finetune record",
                                "run featurecache finetune again with --restart")
    except FileNotFoundError:
        if directory.is_dir():
            raise CacheIncompleteError(f"finetune run {name!r} has no record yet: it was stopped before its first "
                                       "evaluation ended, or is still running; rerun the finetune command (with "
                                       f"--name {name}) to finish it") from None
        known = sorted(p.parent.name for p in (cache.path / FINETUNE_DIR).glob(f"*/{FINETUNE_RECORD}"))
        raise HeadError(f"no finetune run {name!r} on {cache.path.name} (runs: {', '.join(known) or 'none yet'}); "
                        "run featurecache finetune first") from None


def unfinished(cache: Cache, record: dict) -> str | None:
    """What to say of a run that has not done every epoch asked for; None when it is complete."""
    if record.get("complete") is True:
        return None
    spec = record.get("spec") or {}
    return (f"finetune run {record.get('name')!r} is unfinished ({record.get('epochs_done')} of "
            f"{spec.get('epochs')} epochs); rerun the finetune command to finish it: "
            f"{finetune_command(cache.path, record.get('name'), spec)}")


def load_finetune_run(cache: Cache | str | Path, name: str, *,
                      unfinished_ok: bool = False) -> tuple[Predictor, str | None]:
    """The fine-tuned backbone and classifier of `finetune/<name>/` as a Predictor, and a warning
    when the run is unfinished. An unfinished run is refused unless `unfinished_ok` (then its
    best epoch so far is used): an exported model must be final."""
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    record = read_finetune_record(cache, name)
    if record.get("parent_key") != cache.key:
        raise MismatchError(f"finetune run {name!r} was made from other features (cache key "
                            f"{str(record.get('parent_key'))[:12]}, this cache is {cache.key[:12]}); run it again")
    warning = unfinished(cache, record)
    if warning and not unfinished_ok:
        raise CacheIncompleteError(warning)
    directory = cache.path / FINETUNE_DIR / name
    backbone, preprocessing = cache_backbone(cache)
    try:
        tensors, metadata = read_output(directory / BACKBONE_FILE)
        load_network_state(backbone, tensors)
        epochs = {"backbone": json.loads(metadata[STATE_METADATA])["epoch"]}
        tensors, metadata = read_output(directory / HEAD_FILE)
        head_meta = json.loads(metadata[HEAD_METADATA])
        head = head_from_saved(head_meta["config"], tensors)
        epochs["head"] = head_meta["epoch"]
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CorruptCacheError(f"finetune run {directory} does not hold a valid backbone and head "
                                f"({type(error).__name__}: {str(error)[:160]}); run it again with --restart") from None
    if set(epochs.values()) != {record.get("best_epoch")}:
        found = f"backbone of epoch {epochs['backbone']}, head of epoch {epochs['head']}"
        if warning:  # stopped, or running, between writing the weights and the record
            raise CacheIncompleteError(f"finetune run {name!r} is being written ({found}, its record's best epoch "
                                       f"is {record.get('best_epoch')}); {warning.split('; ', 1)[1]}")
        raise CorruptCacheError(f"finetune run {directory} holds a {found}, but its record's best epoch is "
                                f"{record.get('best_epoch')}; run it again with --restart")
    # --from-cache trained on the entry's activations: decode files as its extract did; a run on
    # images trained on PIL's full-size decode
    draft_size, decode = file_decoding(cache) if (record.get("spec") or {}).get("from_cache") else (None, "pil")
    return Predictor(backbone.eval().to(memory_format=torch.channels_last), preprocessing, "pool",
                     head.as_module().eval(), cache.classes, cache.manifest["dtype"], draft_size, decode), warning


def load_finetuned_predictor(cache: Cache | str | Path, name: str) -> Predictor:
    """The fine-tuned backbone and classifier of a finished run `finetune/<name>/` as a Predictor."""
    return load_finetune_run(cache, name)[0]
