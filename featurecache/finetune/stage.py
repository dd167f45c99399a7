"""The finetune stage: unfreeze the last blocks, starting from the cache's own checkpoint.

The backbone is rebuilt from the checkpoint the cache was extracted with (no network);
the classifier starts as a fitted head (linear probe, then fine-tune: LP-FT), with its
standardisation folded in, so before the first step the model *is* backbone + head and
its validation accuracy equals the head's. Everything before the unfrozen blocks stays
frozen and in eval mode (BatchNorm statistics untouched). Each epoch ends with a
validation pass, an atomic resume checkpoint and, when it is the best so far, the
outputs `finetune/<name>/backbone.safetensors` (accepted by `extract --weights`) and
`head.safetensors`, described by `finetune.json` (complete only once every epoch is done;
see runs.py). A rerun resumes from the checkpoint when its settings are the run's (spec.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
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
from ..errors import CacheNotFoundError, CorruptCacheError, HeadError, UsageError
from .data import Augmentation, ImageRows, Progress, TapRows, epoch_order, evaluate, train_epoch
from ..fit.headstore import check_head_name, load_head, read_record_with_checksum
from ..cache.atomic import remove_stale_temporaries, storage_error, write_json_atomic
from ..cache.integrity import seal_json
from ..serve.predict import cache_backbone
from ..data.sources import reopen_source
from ..cache.layout import CHECKPOINT_FILE, FINETUNE_DIR, FINETUNE_RECORD, finetune_run_name
from ..cache.store import Cache, open_cache
from .runs import (load_checkpoint, load_finetuned_predictor, load_outputs, read_checkpoint, read_finetune_record,
                   save_checkpoint, save_outputs)
from .spec import HEAD_FIT, FinetuneSpec, check_finetune_spec, resume_refusal, spec_dict

__all__ = ["FinetuneSpec", "FinetuneResult", "check_finetune_spec", "finetune", "load_finetuned_predictor",
           "read_finetune_record"]

log = logging.getLogger("featurecache")

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
    command = _extract_command(cache, [*cache.taps, tap])
    return (f"--from-cache with --unfreeze {spec.unfreeze} trains from the activations of tap {tap}, which "
            f"{cache.path.name} lacks (it has {', '.join(cache.taps)}); run: {command}, then fit-head and "
            "finetune that entry, or drop --from-cache")


def _extract_command(cache: Cache, taps: list[str]) -> str:
    """The extract command that makes `cache`'s entry again with `taps`, in its own cache root,
    ready to paste into a shell."""
    from ..cache.store import default_root

    made = cache.manifest["spec"]
    words = ["featurecache", "extract", made["source"], "--model", made["model"], "--weights", made["weights"]]
    for option in ("seed", "image_size", "crop_mode", "name"):
        if made.get(option):
            words += [f"--{option.replace('_', '-')}", str(made[option])]
    if made.get("decode", "pil") != "pil":
        words += ["--decode", made["decode"]]
    words += [flag for flag, on in (("--draft", made.get("draft")), ("--content-hash", made.get("content_hash")),
                                    ("--allow-layout", made.get("allow_layout"))) if on]
    words += [word for split in made.get("unlabeled") or () for word in ("--unlabeled", split)]
    words += ["--dtype", made["dtype"], "--precision", made["precision"]]
    if cache.path.parent.resolve() != default_root().resolve():  # else it would land in the default root
        words += ["--root", str(cache.path.parent)]
    return shlex.join(words + [word for t in dict.fromkeys(taps) for word in ("--tap", t)])


def model_preprocessing(cache: Cache) -> Preprocessing:
    return Preprocessing.from_dict(cache.manifest["config"]["preprocessing"])


def _split_rows(cache: Cache, record: dict) -> dict[str, tuple[str, np.ndarray | None]]:
    """train/val(/test) as (cache split, row subset): the starting head's own validation rows."""
    from ..fit.carve import BY_PATH, carved_rows
    from ..fit.stage import head_validation

    labeled = cache.labeled_splits  # unlabeled splits are neither trained nor scored on
    selection = record.get("selection_split") or ("val" if labeled.get("val") else "val (from train)")
    rows: dict[str, tuple[str, np.ndarray | None]] = {}
    if selection == "val" and labeled.get("val"):
        rows = {"train": ("train", None), "val": ("val", None)}
    else:
        validation = head_validation(record)  # by path, or by position for a head fitted before
        if validation["split"] != "train":  # chosen on a val split this entry no longer has labelled
            head_spec = record.get("spec") or {}
            validation = {"fraction": head_spec.get("val_fraction") or 0.2, "seed": head_spec.get("seed", 0),
                          "carve": BY_PATH}
        train, val = carved_rows(cache, validation)
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
    # The resolved starting head and which fit of it: a head fitted again may carve other validation rows.
    settings = {**spec_dict(spec), "head": head_name, HEAD_FIT: read_record_with_checksum(cache, head_name)[1]}
    record = {
        "name": name, "parent_cache": cache.path.name, "parent_key": cache.key,
        "arch": cache.manifest["config"]["arch"], "starting_head": head_name,
        "starting_head_metrics": {s: {"top1": m.get("top1")} for s, m in head_record["metrics"].items()},
        "trainable_blocks": model.trainable, "input_tap": model.input_tap, "spec": spec_dict(spec),
        "path": "cached activations" if spec.from_cache else "images", "augmentation":
        dataclasses.asdict(augmentation) if augmentation else None, "device": str(device), "precision": precision,
        "rows": {role: len(r) for role, r in rows.items()}, "tool_version": __version__,
        "rng": "torch.manual_seed(seed + epoch) and a shuffling generator seeded the same way at each epoch start",
    }
    steps_per_epoch = len(epoch_order(len(rows["train"]), spec.batch_size, None))
    state = {"epoch": 0, "step": 0, "best_epoch": 0, "history": [], "settings": settings}
    resumed_from = 0
    if checkpoint.exists() and not spec.restart:
        state = _resume(checkpoint, name, settings, model, optimizer, scaler, state)
        resumed_from = state["epoch"]
        log.info("resuming %s after epoch %d", name, resumed_from)
    if state["epoch"] == 0:  # epoch 0: the starting head on the unchanged backbone
        try:  # an earlier run's record and checkpoint go first: they must never describe the new outputs
            for old in (directory / FINETUNE_RECORD, checkpoint):
                old.unlink(missing_ok=True)
        except OSError as error:
            raise storage_error(error, directory, "the finetune folder") from None
        metrics = evaluate(model, rows["val"], cache.classes, batch_size=spec.batch_size, device=device,
                           precision=precision)
        state["history"] = [{"epoch": 0, "val_top1": metrics["top1"], "val_loss": metrics["log_loss"], "seconds": 0.0}]
        save_outputs(directory, model, cache, head_record["config"], {"epoch": 0, **_small(record)})
        write_json_atomic(directory / FINETUNE_RECORD, seal_json({**record, **_summary(state), "complete": False}))
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
            save_outputs(directory, model, cache, head_record["config"], {"epoch": epoch, **_small(record)})
        state["epoch"] = epoch
        save_checkpoint(checkpoint, model, optimizer, scaler, state)
        write_json_atomic(directory / FINETUNE_RECORD, seal_json({**record, **_summary(state), "complete": False}))
    if state["best_epoch"] != state["epoch"]:
        load_outputs(directory, model)
        model.to(device, memory_format=torch.channels_last)
    final = {**record, **_summary(state), "complete": True}
    if "test" in rows:
        test = evaluate(model, rows["test"], cache.classes, batch_size=spec.batch_size, device=device,
                        precision=precision)
        final["test_metrics"] = {"top1": test["top1"], "log_loss": test["log_loss"], "n": test["n"]}
    final = seal_json(final)
    write_json_atomic(directory / FINETUNE_RECORD, final)
    return FinetuneResult(name, directory, final, resumed_from)


def _resume(checkpoint: Path, name: str, settings: dict, model: FinetuneModel, optimizer, scaler, state: dict) -> dict:
    """The state of the checkpoint, loaded into model, optimizer and scaler once its settings are
    known to be these (other blocks or another head would not even load)."""
    advice = f"the checkpoint {checkpoint} is unreadable or damaged ({{}}); pass --restart to start over"
    try:
        tensors, saved = read_checkpoint(checkpoint)
        refusal = resume_refusal(name, dict(saved["settings"]), settings)
    except (CorruptCacheError, CacheNotFoundError, OSError, KeyError, ValueError, TypeError, AttributeError,
            json.JSONDecodeError) as error:
        raise UsageError(advice.format(str(error)[:200])) from None
    if refusal:
        raise UsageError(refusal)
    try:
        load_checkpoint(tensors, saved, model, optimizer, scaler)
        return {k: saved[k] for k in state}
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as error:
        raise UsageError(advice.format(str(error)[:200])) from None


def _small(record: dict) -> dict:
    return {k: record[k] for k in ("name", "parent_cache", "parent_key", "starting_head", "arch")}


def _summary(state: dict) -> dict:
    best = state["history"][state["best_epoch"]]
    return {"epochs_done": state["epoch"], "best_epoch": state["best_epoch"], "best_val_top1": best["val_top1"],
            "history": state["history"]}
