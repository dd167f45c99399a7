"""What a finetune run is asked to do: its spec, the checks on it, and which of its settings
a resumed run must share with the run it continues (said back as the command's options)."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from dataclasses import dataclass

from ..errors import UsageError
from ..fit.headstore import check_head_name

#: Spec fields that do not change the numbers; a resumed run may differ in them. The name is
#: the run's folder itself, given or made from head and unfreeze.
_RESUME_FREE = ("workers", "restart", "device", "name")
#: Settings of the image path's augmentation, which --from-cache never uses.
_AUGMENTATION = ("augment", "crop_scale", "hflip")
#: The fit of the starting head a run began from (a head fitted again may carve other validation rows).
HEAD_FIT = "starting_head_checksum"


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


def spec_dict(spec: FinetuneSpec) -> dict:
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


def resume_settings(settings: dict) -> dict:
    """The settings (a spec as JSON) a resumed run must share with its checkpoint: not those that
    leave the numbers as they are, nor, with --from-cache, the augmentation it never uses."""
    ignored = _RESUME_FREE + (_AUGMENTATION if settings.get("from_cache") else ())
    return {k: v for k, v in settings.items() if k not in ignored}


def option(field: str, value) -> str:
    """A setting as the finetune command's option, e.g. `--unfreeze layer4`, `--no-hflip`."""
    flag = "--" + field.replace("_", "-")
    if field == "from_cache" or value is None:
        return flag if value else f"no {flag}"
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    if field == "crop_scale":
        return f"--crop-min {value[0]}"
    return f"{flag} {value}"


def finetune_command(entry, name: str, settings: dict) -> str:
    """The finetune command that resumes run `name` of `entry`: its settings that are not the defaults."""
    defaults = spec_dict(FinetuneSpec())
    options = [option(k, v) for k, v in resume_settings(settings).items() if k in defaults and v != defaults[k]]
    return " ".join(["featurecache finetune", shlex.quote(str(entry)), "--name", shlex.quote(name), *options])


def resume_refusal(name: str, saved: dict, current: dict) -> str | None:
    """Why run `name`, whose checkpoint holds the settings `saved`, cannot resume with `current`
    (each setting that differs, as its option); None when it can."""
    saved, current = resume_settings(saved), resume_settings(current)
    if HEAD_FIT not in saved:
        return (f"finetune run {name!r} was started by an older featurecache, whose checkpoint does not record "
                "which fit of its starting head it began from; pass --restart to start over, or --name NEW to keep "
                "it and start another")
    keys = saved.keys() | current.keys()
    if saved.get("from_cache") != current.get("from_cache"):
        keys -= set(_AUGMENTATION)  # a change of path is reported as such, not as its augmentation
    if saved.get("head") != current.get("head"):
        keys.discard(HEAD_FIT)  # another head is another fit: said once
    parts = []
    for key in sorted(k for k in keys if saved.get(k) != current.get(k)):
        if key == HEAD_FIT:
            parts.append(f"another fit of head {current.get('head')} (it was fitted again since)")
        else:
            parts.append(f"{option(key, saved.get(key))} (now {option(key, current.get(key))})")
    if not parts:
        return None
    return (f"finetune run {name!r} was started with {' and '.join(parts)}; pass the same values to resume it, "
            "--restart to start over, or --name NEW to keep it and start another")
