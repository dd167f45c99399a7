"""The finetune stage: unfreeze the last blocks, starting from the cache's own checkpoint.

The backbone is rebuilt from the checkpoint the cache was extracted with (no network);
the classifier starts as a fitted head (linear probe, then fine-tune: LP-FT), with its
standardisation folded in, so before the first step the model *is* backbone + head and
its validation accuracy equals the head's. Everything before the unfrozen blocks stays
frozen and in eval mode (BatchNorm statistics untouched). Each epoch ends with a
validation pass, an atomic resume checkpoint and, when it is the best so far, the
outputs `finetune/<name>/backbone.safetensors` (accepted by `extract --weights`) and
`head.safetensors`, described by `finetune.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..backbones.registry import Preprocessing, StagedBackbone, get_backbone
from ..device import resolve_device, resolve_precision
from ..extract.engine import default_workers
from ..errors import CacheNotFoundError, CorruptCacheError, HeadError, MismatchError, UsageError
from .data import Augmentation, ImageRows, Progress, TapRows, epoch_order, evaluate, train_epoch
from ..fit.headstore import check_head_name, load_head
from ..cache.atomic import remove_stale_temporaries, storage_error, write_json_atomic
from ..cache.integrity import read_safetensors, read_sealed_json, seal_json, write_safetensors
from ..heads.registry import head_from_saved
from ..serve.predict import Predictor, cache_backbone
from ..data.sources import reopen_source
from ..cache.layout import BACKBONE_FILE, CHECKPOINT_FILE, FINETUNE_DIR, FINETUNE_RECORD, HEAD_FILE, finetune_run_name
from ..cache.store import Cache, open_cache
from ..backbones.weights import ARCH_METADATA, PREPROCESSING_METADATA

log = logging.getLogger("featurecache")

STATE_METADATA = "featurecache.finetune"
HEAD_METADATA = "featurecache.head"
#: Spec fields that do not change the numbers; a resumed run may differ in them.
_RESUME_FREE = ("workers", "restart", "device")


@dataclass(frozen=True, kw_only=True)
class FinetuneSpec:
    """What `finetune` needs; stored in finetune.json and in every checkpoint."""

    head: str | None = None  # starting head; None picks the cache's best logistic head
    unfreeze: str | None = None  # STAGE | STAGE+ | N (the last N blocks); None: the backbone's default
    epochs: int = 5
    lr: float = 3e-4  # the head's learning rate (AdamW, cosine decay per step)
    backbone_lr: float = 3e-5  # the unfrozen blocks' (lower: they start from good features)
    weight_decay: float = 1e-4  # on weights only, not on biases or BatchNorm
    batch_size: int = 32
    from_cache: bool = False  # train from the cached activations (no augmentation possible)
    augment: bool = True  # random resized crop + flip (image path only)
    crop_scale: tuple[float, float] = (0.25, 1.0)  # area range of the random resized crop
    hflip: bool = True
    train_bn: bool = False  # update the unfrozen blocks' BatchNorm statistics (default: keep them)
    name: str | None = None  # folder under finetune/; default "<head>-<unfreeze>[-cache]"
    device: str = "auto"
    precision: str = "auto"  # auto picks fp32 on CPUs without native bf16 (emulated bf16 is ~5x slower)
    workers: int | None = None  # image-decoding workers; None picks from the machine
    seed: int = 0
    restart: bool = False  # ignore an existing checkpoint and start over


@dataclass
class FinetuneResult:
    name: str
    path: Path  # the finetune/<name>/ folder
    record: dict  # finetune.json
    resumed_from: int  # last epoch already done before this call (0: fresh start)

    @property
    def best(self) -> dict:
        return self.record["history"][self.record["best_epoch"]]


def with_default_unfreeze(spec: FinetuneSpec, arch: str) -> FinetuneSpec:
    """`spec` with `unfreeze` filled in from the backbone's description when not given
    (ResNets: their last stage, layer4; other backbones: their last block)."""
    if spec.unfreeze is not None:
        return spec
    return dataclasses.replace(spec, unfreeze=get_backbone(arch).description.default_unfreeze)


def parse_unfreeze(backbone: StagedBackbone, value: str) -> list[str]:
    """Names of the blocks to train, e.g. ["layer4.0", "layer4.1"]; always trailing. The
    vocabulary comes from the backbone's feature description."""
    return backbone.description.parse_unfreeze(backbone, value)


class FinetuneModel(nn.Module):
    """Frozen stages -> trainable blocks -> pool -> the head's logits module.

    `forward(x, from_tap=True)` starts from the activations of `input_tap` (the fast
    path); otherwise from normalised images. In evaluation mode the pooled features are
    rounded to the cache's storage dtype, as the starting head saw them.
    """

    def __init__(self, backbone: StagedBackbone, head: nn.Module, trainable: list[str], storage_dtype: str,
                 *, train_bn: bool = False) -> None:
        super().__init__()
        self.backbone, self.head, self.trainable, self.train_bn = backbone, head, trainable, train_bn
        self.round_to = torch.float16 if storage_dtype == "float16" else None
        backbone.requires_grad_(False)
        for name in trainable:
            backbone.get_submodule(name).requires_grad_(True)
        self.start = backbone.block_stage(trainable[0])  # first stage with a trainable block
        self.stop = backbone.tap_index(backbone.description.final_tap) + 1
        self.input_tap = backbone.input_tap(self.start)  # the cached tap the fast path starts from
        self.train()

    def train(self, mode: bool = True) -> "FinetuneModel":
        super().train(mode)
        self.backbone.eval()  # frozen BatchNorm keeps using (and never updates) its statistics
        for name in self.trainable:
            block = self.backbone.get_submodule(name).train(mode)
            if not self.train_bn:  # small batches give noisy statistics; the affine parameters still train
                for module in block.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def forward(self, x: torch.Tensor, from_tap: bool = False) -> torch.Tensor:
        if not from_tap:
            with torch.no_grad():
                x = self.backbone.run(x, 0, self.start)
        x = self.backbone.run(x, self.start, self.stop)  # frozen leading blocks of this stage build no graph
        features = self.backbone.read(self.backbone.description.final_tap, x).float()
        if not self.training and self.round_to is not None:
            features = features.to(self.round_to).float()
        return self.head(features)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What training changes: the trainable blocks (with their BatchNorm buffers) and the head."""
        prefixes = tuple(f"backbone.{name}." for name in self.trainable) + ("head.",)
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k.startswith(prefixes)}


def network_state(backbone: StagedBackbone) -> dict[str, torch.Tensor]:
    """The backbone's state under the network's own names (classifier excluded), as `extract
    --weights` expects: the stages share the network's modules."""
    state = backbone.description.backbone_state(backbone.network.state_dict())
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def load_network_state(backbone: StagedBackbone, state: dict[str, torch.Tensor]) -> None:
    backbone.network.load_state_dict(backbone.description.backbone_state(state))


def _starting_head(cache: Cache, name: str | None):
    if name is None:
        from ..fit.stage import leaderboard

        candidates = [r["name"] for r in leaderboard(cache) if r["head"] == "logistic" and r["tap"] == "pool"
                      and not r["stale"]]
        if not candidates:
            raise HeadError(f"{cache.path.name} has no logistic head on tap pool to start from; run "
                            f"featurecache fit-head {cache.path.name} --head logistic first, or pass --head NAME")
        name = candidates[0]
    head, record = load_head(cache, name)
    if record.get("tap") != "pool":
        raise HeadError(f"head {name!r} uses tap {record.get('tap')!r}; fine-tuning starts from a head on tap pool")
    if not hasattr(head, "as_logits_module"):
        raise HeadError(f"head {name!r} ({record.get('head')}) cannot initialise a trainable classifier; "
                        "use a logistic or mlp head")
    return name, head, record


def _rows(cache: Cache, split_rows: dict[str, tuple[str, np.ndarray | None]], spec: FinetuneSpec, model: FinetuneModel):
    """ImageRows or TapRows for each of train/val/test, as the starting head split them."""
    tap = model.input_tap
    if spec.from_cache and (tap is None or tap not in cache.tap_shapes):
        raise UsageError(_missing_tap_message(cache, spec, tap))
    source = None if spec.from_cache else reopen_source(cache.manifest["spec"])
    by_path = {} if source is None else {s.path: s for s in source.samples}
    workers = default_workers() if spec.workers is None else spec.workers
    out = {}
    for role, (split, subset) in split_rows.items():
        labels = cache.labels(split)
        keep = np.arange(len(labels)) if subset is None else subset
        if spec.from_cache:
            out[role] = TapRows(cache.row_reader(split, tap), keep, labels[keep])
            continue
        paths = cache.paths(split)
        missing = [paths[i] for i in keep if paths[i] not in by_path]
        if missing:
            raise CacheNotFoundError(f"{len(missing)} images of {cache.path.name} are gone from the source "
                                     f"(first: {missing[0]}); extract it again")
        out[role] = ImageRows(source, [by_path[paths[i]] for i in keep], labels[keep],
                              model_preprocessing(cache), workers=workers)
    return out


def _missing_tap_message(cache: Cache, spec: FinetuneSpec, tap: str | None) -> str:
    if tap is None:
        return (f"--from-cache cannot unfreeze these blocks (--unfreeze {spec.unfreeze}): their input is not a tap "
                f"{cache.manifest['config']['arch']} can store (a ResNet's stem output is not; a timm model other "
                "than a ViT, ConvNeXt, EfficientNet or ResNet runs its features as one stage, so no tap holds a "
                "block's input); unfreeze fewer blocks, or drop --from-cache")
    made = cache.manifest["spec"]
    command = f"featurecache extract {made['source']} --model {made['model']} --weights {made['weights']}"
    if made.get("seed"):
        command += f" --seed {made['seed']}"
    if made.get("image_size"):
        command += f" --image-size {made['image_size']}"
    for option in ("dtype", "precision"):
        command += f" --{option} {made[option]}"
    command += " " + " ".join(f"--tap {t}" for t in dict.fromkeys([*cache.taps, tap]))
    return (f"--from-cache with --unfreeze {spec.unfreeze} trains from the activations of tap {tap}, which "
            f"{cache.path.name} lacks (it has {', '.join(cache.taps)}); run: {command}, then fit-head and "
            "finetune that entry, or drop --from-cache")


def model_preprocessing(cache: Cache) -> Preprocessing:
    return Preprocessing.from_dict(cache.manifest["config"]["preprocessing"])


def _split_rows(cache: Cache, record: dict) -> dict[str, tuple[str, np.ndarray | None]]:
    """train/val(/test) as (cache split, row subset): the starting head's own validation rows."""
    from ..fit.stage import _stratified_split

    labeled = cache.labeled_splits  # unlabeled splits are neither trained nor scored on
    selection = record.get("selection_split") or ("val" if labeled.get("val") else "val (from train)")
    rows: dict[str, tuple[str, np.ndarray | None]] = {}
    if selection == "val" and labeled.get("val"):
        rows = {"train": ("train", None), "val": ("val", None)}
    else:
        head_spec = record.get("spec") or {}
        fraction = head_spec.get("val_fraction") or 0.2
        train, val = _stratified_split(cache.labels("train"), fraction, head_spec.get("seed", 0))
        rows = {"train": ("train", np.sort(train)), "val": ("train", np.sort(val))}
    if labeled.get("test"):
        rows["test"] = ("test", None)
    return rows


def build_model(cache: Cache, spec: FinetuneSpec) -> tuple[FinetuneModel, str, dict]:
    """The LP-FT starting point: (model, starting head name, its record)."""
    head_name, head, record = _starting_head(cache, spec.head)
    backbone, _ = cache_backbone(cache)
    trainable = parse_unfreeze(backbone, spec.unfreeze or backbone.description.default_unfreeze)
    model = FinetuneModel(backbone, head.as_logits_module(), trainable, cache.manifest["dtype"], train_bn=spec.train_bn)
    return model, head_name, record


def _optimizer(model: FinetuneModel, spec: FinetuneSpec) -> torch.optim.Optimizer:
    groups = []
    for part, lr in ((model.backbone, spec.backbone_lr), (model.head, spec.lr)):
        params = [p for p in part.parameters() if p.requires_grad]
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "base_lr": lr,
                               "weight_decay": spec.weight_decay if decay else 0.0})
    return torch.optim.AdamW(groups)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    write_safetensors(path, tensors, metadata, "the finetune output")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A finetune output or checkpoint, every checksum checked."""
    try:
        return read_safetensors(path, "finetune output", "run featurecache finetune again with --restart")
    except FileNotFoundError:
        raise CacheNotFoundError(f"the finetune output {path} is missing; run featurecache finetune again "
                                 "with --restart") from None


def _save_checkpoint(path: Path, model: FinetuneModel, optimizer, scaler, state: dict) -> None:
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
    _write_safetensors(path, tensors, {STATE_METADATA: json.dumps(state)})


def _load_checkpoint(path: Path, model: FinetuneModel, optimizer, scaler) -> dict:
    tensors, metadata = _read_safetensors(path)
    state = json.loads(metadata[STATE_METADATA])
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
    optimizer_state: dict = {}
    for key, value in [*((k[len("optimizer."):], v) for k, v in tensors.items() if k.startswith("optimizer.")),
                       *state["optimizer_scalars"].items()]:
        index, name = key.split(".", 1)
        optimizer_state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} for g in state["optimizer_groups"]]
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})
    scaler.load_state_dict(state["scaler"])
    return state


def _save_outputs(directory: Path, model: FinetuneModel, cache: Cache, head_config: dict, provenance: dict) -> None:
    arch = cache.manifest["config"]["arch"]
    _write_safetensors(directory / BACKBONE_FILE, network_state(model.backbone), {
        ARCH_METADATA: arch, PREPROCESSING_METADATA: json.dumps(cache.manifest["config"]["preprocessing"]),
        STATE_METADATA: json.dumps(provenance)})
    head_state = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    _write_safetensors(directory / HEAD_FILE, head_state,
                       {HEAD_METADATA: json.dumps({"config": head_config, **provenance})})


def _load_outputs(directory: Path, model: FinetuneModel) -> None:
    load_network_state(model.backbone, _read_safetensors(directory / BACKBONE_FILE)[0])
    model.head.load_state_dict(_read_safetensors(directory / HEAD_FILE)[0])


def _spec_dict(spec: FinetuneSpec) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def check_finetune_spec(spec: FinetuneSpec) -> None:
    """Refuse bad settings before any work, one message per field."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not integer(spec.epochs) or not 1 <= spec.epochs <= 100_000:
        raise UsageError(f"--epochs must be an integer of at least 1, got {spec.epochs!r}")
    if not integer(spec.batch_size) or not 2 <= spec.batch_size <= 1 << 20:
        raise UsageError(f"--batch-size must be an integer of at least 2, got {spec.batch_size!r}")
    for field_name in ("lr", "backbone_lr", "weight_decay"):
        value = getattr(spec, field_name)
        if not number(value) or value < 0 or (field_name == "lr" and value == 0):
            raise UsageError(f"--{field_name.replace('_', '-')} must be a {'positive' if field_name == 'lr' else 'non-negative'}"
                             f" number, got {value!r}")
    scale = spec.crop_scale
    if not (isinstance(scale, (tuple, list)) and len(scale) == 2 and all(number(v) for v in scale)
            and 0 < scale[0] <= scale[1] <= 1):
        raise UsageError(f"--crop-min must be in (0, 1] (crop_scale {scale!r})")
    if not integer(spec.seed) or not 0 <= spec.seed < 2**32:
        raise UsageError(f"--seed must be an integer from 0 to 2**32 - 1, got {spec.seed!r}")
    if spec.workers is not None and (not integer(spec.workers) or spec.workers < 0):
        raise UsageError(f"--workers must be a non-negative integer, got {spec.workers!r}")
    if spec.unfreeze is not None and (not isinstance(spec.unfreeze, str) or not spec.unfreeze.strip()):
        raise UsageError(f"--unfreeze must name the blocks to train (a stage such as layer4, STAGE+ or a number of "
                         f"trailing blocks), got {spec.unfreeze!r}")
    if spec.name is not None:
        check_head_name(spec.name, "finetune run")
    if spec.head is not None:
        check_head_name(spec.head)


def finetune(cache: Cache | str | Path, spec: FinetuneSpec, progress: Progress | None = None) -> FinetuneResult:
    """Fine-tune the cache's backbone and a fitted head; resumes an interrupted run of the same spec."""
    check_finetune_spec(spec)
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    spec = with_default_unfreeze(spec, cache.manifest["config"]["arch"])
    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    model, head_name, head_record = build_model(cache, spec)
    name = check_head_name(spec.name or finetune_run_name(head_name, spec.unfreeze, spec.from_cache))
    rows = _rows(cache, _split_rows(cache, head_record), spec, model)
    model.to(device, memory_format=torch.channels_last)
    optimizer = _optimizer(model, spec)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
    augmentation = Augmentation(scale=tuple(spec.crop_scale), hflip=spec.hflip) \
        if spec.augment and not spec.from_cache else None
    directory = cache.path / FINETUNE_DIR / name
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise storage_error(error, directory, "the finetune folder") from None
    remove_stale_temporaries(directory)  # of a killed earlier write
    checkpoint = directory / CHECKPOINT_FILE
    settings = {k: v for k, v in _spec_dict(spec).items() if k not in _RESUME_FREE}
    record = {
        "name": name, "parent_cache": cache.path.name, "parent_key": cache.key,
        "arch": cache.manifest["config"]["arch"], "starting_head": head_name,
        "starting_head_metrics": {s: {"top1": m.get("top1")} for s, m in head_record["metrics"].items()},
        "trainable_blocks": model.trainable, "input_tap": model.input_tap, "spec": _spec_dict(spec),
        "path": "cached activations" if spec.from_cache else "images", "augmentation":
        dataclasses.asdict(augmentation) if augmentation else None, "device": str(device), "precision": precision,
        "rows": {role: len(r) for role, r in rows.items()}, "tool_version": __version__,
        "rng": "torch.manual_seed(seed + epoch) and a shuffling generator seeded the same way at each epoch start",
    }
    steps_per_epoch = len(epoch_order(len(rows["train"]), spec.batch_size, None))
    state = {"epoch": 0, "step": 0, "best_epoch": 0, "history": [], "settings": settings}
    resumed_from = 0
    if checkpoint.exists() and not spec.restart:
        try:
            saved = _load_checkpoint(checkpoint, model, optimizer, scaler)
        except (CorruptCacheError, CacheNotFoundError, OSError, KeyError, ValueError, TypeError, RuntimeError,
                json.JSONDecodeError) as error:
            raise UsageError(f"the checkpoint {checkpoint} is unreadable or damaged ({str(error)[:200]}); "
                             "pass --restart to start over") from None
        if saved["settings"] != settings:
            changed = sorted(k for k in settings if saved["settings"].get(k) != settings[k])
            raise UsageError(f"{directory} was started with other settings ({', '.join(changed)}); "
                             "pass --restart to start over, or --name to write elsewhere")
        state, resumed_from = {k: saved[k] for k in state}, saved["epoch"]
        log.info("resuming %s after epoch %d", name, resumed_from)
    if state["epoch"] == 0:  # epoch 0: the starting head on the unchanged backbone
        metrics = evaluate(model, rows["val"], cache.classes, batch_size=spec.batch_size, device=device,
                           precision=precision)
        state["history"] = [{"epoch": 0, "val_top1": metrics["top1"], "val_loss": metrics["log_loss"], "seconds": 0.0}]
        _save_outputs(directory, model, cache, head_record["config"], {"epoch": 0, **_small(record)})
    for epoch in range(state["epoch"] + 1, spec.epochs + 1):
        started = time.perf_counter()
        torch.manual_seed(spec.seed + epoch)
        generator = torch.Generator().manual_seed(spec.seed + epoch)
        train_metrics, state["step"] = train_epoch(
            model, rows["train"], optimizer=optimizer, scaler=scaler, step=state["step"],
            total_steps=steps_per_epoch * spec.epochs, batch_size=spec.batch_size, generator=generator,
            augmentation=augmentation, device=device, precision=precision, seed=spec.seed + epoch,
            progress=progress, epoch=epoch)
        metrics = evaluate(model, rows["val"], cache.classes, batch_size=spec.batch_size, device=device,
                           precision=precision)
        state["history"].append({"epoch": epoch, **train_metrics, "val_top1": metrics["top1"],
                                 "val_loss": metrics["log_loss"], "seconds": time.perf_counter() - started})
        if progress:
            progress({"phase": "val", **state["history"][-1], "epochs": spec.epochs})
        if metrics["top1"] > state["history"][state["best_epoch"]]["val_top1"]:
            state["best_epoch"] = epoch
            _save_outputs(directory, model, cache, head_record["config"], {"epoch": epoch, **_small(record)})
        state["epoch"] = epoch
        _save_checkpoint(checkpoint, model, optimizer, scaler, state)
        write_json_atomic(directory / FINETUNE_RECORD, seal_json({**record, **_summary(state), "complete": False}))
    if state["best_epoch"] != state["epoch"]:
        _load_outputs(directory, model)
        model.to(device, memory_format=torch.channels_last)
    final = {**record, **_summary(state), "complete": True}
    if "test" in rows:
        test = evaluate(model, rows["test"], cache.classes, batch_size=spec.batch_size, device=device,
                        precision=precision)
        final["test_metrics"] = {"top1": test["top1"], "log_loss": test["log_loss"], "n": test["n"]}
    final = seal_json(final)
    write_json_atomic(directory / FINETUNE_RECORD, final)
    return FinetuneResult(name, directory, final, resumed_from)


def _small(record: dict) -> dict:
    return {k: record[k] for k in ("name", "parent_cache", "parent_key", "starting_head", "arch")}


def _summary(state: dict) -> dict:
    best = state["history"][state["best_epoch"]]
    return {"epochs_done": state["epoch"], "best_epoch": state["best_epoch"], "best_val_top1": best["val_top1"],
            "history": state["history"]}


def read_finetune_record(cache: Cache, name: str) -> dict:
    check_head_name(name, "finetune run")
    path = cache.path / FINETUNE_DIR / name / FINETUNE_RECORD
    try:
        return read_sealed_json(path, "finetune record", "run featurecache finetune again with --restart")
    except FileNotFoundError:
        known = sorted(p.name for p in (cache.path / FINETUNE_DIR).glob(f"*/{HEAD_FILE}"))
        raise HeadError(f"no finetune run {name!r} on {cache.path.name} (runs: {', '.join(known) or 'none yet'}); "
                        "run featurecache finetune first") from None


def load_finetuned_predictor(cache: Cache | str | Path, name: str) -> Predictor:
    """The fine-tuned backbone and classifier of `finetune/<name>/` as a Predictor (predict, export)."""
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    record = read_finetune_record(cache, name)
    if record.get("parent_key") != cache.key:
        raise MismatchError(f"finetune run {name!r} was made from other features (cache key "
                            f"{str(record.get('parent_key'))[:12]}, this cache is {cache.key[:12]}); run it again")
    directory = cache.path / FINETUNE_DIR / name
    backbone, preprocessing = cache_backbone(cache)
    try:
        load_network_state(backbone, _read_safetensors(directory / BACKBONE_FILE)[0])
        tensors, metadata = _read_safetensors(directory / HEAD_FILE)
        head_meta = json.loads(metadata[HEAD_METADATA])
        head = head_from_saved(head_meta["config"], tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CorruptCacheError(f"finetune run {directory} does not hold a valid backbone and head "
                                f"({type(error).__name__}: {str(error)[:160]}); run it again with --restart") from None
    return Predictor(backbone.eval().to(memory_format=torch.channels_last), preprocessing, "pool",
                     head.as_module().eval(), cache.classes, cache.manifest["dtype"])
