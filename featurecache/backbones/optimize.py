"""Make the frozen backbone run faster without changing what it computes.

`optimize_backbone` returns a callable with the backbone's signature, `(x, taps) ->
{tap: tensor}`, built one of these ways (`ExtractSpec.optimize`, `--optimize`):

- `eager`: the `StagedBackbone` as is (channels_last).
- `fuse`: a copy with every BatchNorm folded into the convolution before it (eval
  statistics), still eager, so it works under bf16/fp16 autocast and builds in
  a tenth of a second. Measured 1.09-1.14x on the bf16 ResNet50 forward on CPU
  (BENCHMARKS.md).
- `freeze`: TorchScript trace, freeze and `optimize_for_inference`, which folds
  BatchNorm into the convolutions, fuses ReLU and prepacks oneDNN weights. CPU and
  fp32 only; builds in about a second. See BENCHMARKS.md for the measured speed-up.
- `compile`: `torch.compile` with inductor weight freezing. Compiling ResNet50 takes
  about 30 s on 2 CPU cores, so it pays off only on large runs; opt-in. Batches are
  padded to the full batch size so the graph compiles once.
- `auto`: on CPU, `freeze` in fp32 for runs of at least `FREEZE_MIN_IMAGES` images,
  `fuse` otherwise; on GPUs `eager` (cuDNN with channels_last and autocast; folding
  has not been measured there).

All of them compute the same function up to float rounding (in fp32, features within
1e-4 of eager, the same as channels_last vs NCHW; under bf16 autocast, within bf16's
own rounding), so the mode is not part of the cache key; the precision is.
A mode that fails to build falls back to eager with a warning in the log.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .description import FeatureDescription, StagedBackbone
from ..errors import UsageError
from ..options import OPTIMIZE

log = logging.getLogger("featurecache")

# Building the frozen graph costs a fixed 3-15 s for ResNet50 on 2 busy cores; below
# this many images that is more than it saves, so `auto` folds BatchNorm instead.
FREEZE_MIN_IMAGES = 256

Forward = Callable[[torch.Tensor, Sequence[str]], dict[str, torch.Tensor]]


def resolve_optimize(optimize: str, device: torch.device, precision: str, images: int | None = None) -> str:
    """The mode to build; `images` (the dataset's size) lets `auto` skip freezing small runs."""
    optimize = optimize.lower()
    if optimize not in OPTIMIZE:
        raise UsageError(f"unknown --optimize {optimize!r}; use one of {', '.join(OPTIMIZE)}")
    if optimize == "auto":
        if device.type != "cpu":
            return "eager"
        large = images is None or images >= FREEZE_MIN_IMAGES
        return "freeze" if precision == "fp32" and large else "fuse"
    if optimize == "freeze" and (device.type != "cpu" or precision != "fp32"):
        log.info("--optimize freeze needs CPU and fp32; running with BatchNorm folded instead")
        return "fuse"
    return optimize


class _Taps(nn.Module):
    """Fixed taps, tuple output: the shape TorchScript and torch.compile want."""

    def __init__(self, model: StagedBackbone, taps: Sequence[str]) -> None:
        super().__init__()
        self.model, self.taps = model, tuple(taps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(x, self.taps)
        return tuple(outputs[tap] for tap in self.taps)


def optimize_backbone(model: StagedBackbone, taps: Sequence[str], *, mode: str, batch_size: int,
                      image_size: int, device: torch.device) -> Forward:
    """Return `forward(x, taps)` for `mode` (resolved: eager, fuse, freeze or compile)."""
    if mode == "eager":
        return model
    if mode == "fuse":
        return fold_batchnorm(model, getattr(model, "description", None))
    fixed = _Taps(model, taps).eval()
    try:
        if mode == "freeze":
            return _frozen(fixed, taps, image_size, device)
        if mode == "compile":
            return _compiled(fixed, taps, batch_size)
    except Exception as error:  # a tracer or compiler failure must not cost the run
        log.warning("--optimize %s failed (%s); running eager", mode, str(error).splitlines()[0] if str(error) else error)
        return model
    raise UsageError(f"unknown optimize mode {mode!r}")


def fold_batchnorm(model: nn.Module, description: FeatureDescription | None = None) -> nn.Module:
    """A copy of `model` (in eval mode) in which each BatchNorm2d that directly follows a
    Conv2d is folded into it.

    The pairs are found generically: each module is traced with torch.fx and every Conv2d
    whose only consumer is a BatchNorm2d (each called once) is a pair; a module that does
    not trace is searched child by child, pairing adjacent items of an `nn.Sequential` and
    whatever pairs the backbone's description names (`FeatureDescription.fold_pairs`)."""
    folded = copy.deepcopy(model).eval()
    description = description or getattr(folded, "description", None)
    pairs: list[tuple[nn.Module, str, str]] = []
    _find_pairs(folded, description, pairs)
    done: set[tuple[int, str]] = set()
    for parent, conv_name, bn_name in pairs:
        if (id(parent), conv_name) in done:
            continue
        conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None:
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())
            done.add((id(parent), conv_name))
    return folded


def _find_pairs(module: nn.Module, description: FeatureDescription | None,
                pairs: list[tuple[nn.Module, str, str]]) -> None:
    traced = _traced_pairs(module)
    if traced is not None:
        for conv_path, bn_path in traced:
            conv_parent, _, conv_name = conv_path.rpartition(".")
            bn_parent, _, bn_name = bn_path.rpartition(".")
            if conv_parent == bn_parent:  # folding swaps two children of one parent
                pairs.append((module.get_submodule(conv_parent) if conv_parent else module, conv_name, bn_name))
        return
    if isinstance(module, nn.Sequential):
        pairs += [(module, str(i), str(i + 1)) for i in range(len(module) - 1)]
    if description is not None:
        pairs += [(module, conv, bn) for conv, bn in description.fold_pairs(module)]
    for child in module.children():
        _find_pairs(child, description, pairs)


def _traced_pairs(module: nn.Module) -> list[tuple[str, str]] | None:
    """(conv path, batchnorm path) pairs in `module`'s traced graph; None when it does not trace."""
    import torch.fx

    if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) or not any(True for _ in module.children()):
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.fx.Tracer().trace(module)
    except Exception:  # dynamic control flow, unsupported ops: search the children instead
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    found = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(module.get_submodule(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1
                and isinstance(module.get_submodule(source.target), nn.Conv2d)
                and calls[source.target] == 1 and calls[node.target] == 1):
            found.append((source.target, node.target))
    return found


def _frozen(fixed: _Taps, taps: Sequence[str], image_size: int, device: torch.device) -> Forward:
    example = torch.zeros(2, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the fastest CPU path
        traced = torch.jit.trace(fixed, example, check_trace=False)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))

    def forward(x: torch.Tensor, wanted: Sequence[str] = taps) -> dict[str, torch.Tensor]:
        return dict(zip(taps, frozen(x)))

    return forward


def _compiled(fixed: _Taps, taps: Sequence[str], batch_size: int) -> Forward:
    import torch._inductor.config as inductor_config

    compiled = torch.compile(fixed, dynamic=False)

    def forward(x: torch.Tensor, wanted: Sequence[str] = taps) -> dict[str, torch.Tensor]:
        rows = x.shape[0]
        if rows < batch_size:  # pad so the graph is compiled for one shape only
            padding = x.new_zeros((batch_size - rows, *x.shape[1:]))
            x = torch.cat([x, padding]).contiguous(memory_format=torch.channels_last)
        with inductor_config.patch(freezing=True):
            outputs = compiled(x)
        return {tap: value[:rows] for tap, value in zip(taps, outputs)}

    return forward
