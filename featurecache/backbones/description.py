"""A backbone's feature description, in the spirit of timm's `feature_info` and torchvision's
`create_feature_extractor`: what the rest of featurecache knows about a network.

A description cuts a network into **stages** run one after the other (their composition is
the feature extractor), names the **taps** it offers in forward order (each reads one
stage's output, either as is or through a small readout such as "the CLS token", which may
also read earlier stages' outputs), gives
their shapes for an input size, lists the **blocks** that can be unfrozen (submodule paths,
in forward order), and says which state-dict entries are the classifier (ignored).

`StagedBackbone` runs a network through its description: up to a set of taps
(extraction, predict), from a tap to the end (finetune's fast path), or as one module up to
a tap (export). Extraction, BatchNorm folding, finetune and export read only this; the
architecture-specific knowledge lives in one module per family (`resnet.py`, ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BackboneError, UsageError


@dataclass(frozen=True, kw_only=True)
class Tap:
    """One feature a backbone offers."""

    name: str
    stage: str  # the stage whose output it reads
    channels: int
    stride: int | None = None  # None: a vector (channels,); else (channels, ceil(S/stride), ceil(S/stride))
    readout: Callable[[nn.Module], nn.Module] | None = None  # network -> module applied to the stage output
    shape: Callable[[int], tuple[int, ...]] | None = None  # crop size -> per-image shape (overrides stride)
    #: Earlier stages (in forward order) whose outputs the readout also takes, before `stage`'s
    #: (e.g. the class tokens of a ViT's last four blocks).
    reads: tuple[str, ...] = ()

    @property
    def resumable(self) -> bool:
        """Whether the rest of the network can run from this tap (it is a whole stage output)."""
        return self.readout is None


class FeatureDescription:
    """Base class: subclasses give `taps`, `stages()` and, to support finetune, `blocks()`."""

    #: Taps in forward order.
    taps: tuple[Tap, ...] = ()
    #: State-dict key prefixes of the classifier: never loaded, hashed or saved.
    classifier_prefixes: tuple[str, ...] = ()
    #: The tap heads are fitted on for finetune and that `forward_from` ends at by default.
    final_tap: str = "pool"
    default_taps: tuple[str, ...] = ("pool",)
    #: What finetune trains when `--unfreeze` is not given (any value `parse_unfreeze` takes).
    default_unfreeze: str = "1"

    # -- what the network is made of ----------------------------------------------------
    def stages(self, network: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, module) in forward order; names are attribute names (no dots)."""
        raise NotImplementedError

    def blocks(self, staged: "StagedBackbone") -> list[str]:
        """Submodule paths of `staged` that can be unfrozen, in forward order; each lies in
        one stage (`StagedBackbone.block_stage`)."""
        return []

    def strip_classifier(self, network: nn.Module) -> nn.Module:
        """Replace the classifier with an identity (it is never loaded or run)."""
        return network

    def fold_pairs(self, module: nn.Module) -> list[tuple[str, str]]:
        """Extra (conv, batchnorm) child-name pairs of `module` to fold, for structures the
        generic tracer cannot see; most backbones need none."""
        return []

    # -- taps -----------------------------------------------------------------------------
    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.taps)

    def tap(self, name: str) -> Tap:
        for tap in self.taps:
            if tap.name == name:
                return tap
        raise BackboneError(f"unknown tap {name!r}; choose from: {', '.join(self.tap_names)}")

    def tap_shape(self, name: str, crop_size: int) -> tuple[int, ...]:
        tap = self.tap(name)
        if tap.shape is not None:
            return tuple(tap.shape(crop_size))
        if tap.stride is None:
            return (tap.channels,)
        side = math.ceil(crop_size / tap.stride)
        return (tap.channels, side, side)

    def is_classifier_key(self, key: str) -> bool:
        return key.startswith(self.classifier_prefixes) if self.classifier_prefixes else False

    def backbone_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if not self.is_classifier_key(k)}

    # -- finetune -------------------------------------------------------------------------
    def parse_unfreeze(self, staged: "StagedBackbone", value: str) -> list[str]:
        """Blocks to train, always trailing: `N` or `blocks:N` (the last N blocks), the last
        stage's name (its blocks), or `STAGE+` (that stage's blocks and all after). Stage
        names come from the block paths (`stage_of`): layer4, stages.3, blocks.6, blocks."""
        blocks = self.blocks(staged)
        stages = [stage_of(b) for b in blocks]
        groups = list(dict.fromkeys(stages))
        text = value.strip().lower()
        number = re.fullmatch(r"(?:blocks:)?(\d+)", text)
        if number and 1 <= int(number.group(1)) <= len(blocks):
            return blocks[-int(number.group(1)):]
        name, plus = (text[:-1], True) if text.endswith("+") else (text, False)
        lowered = [g.lower() for g in groups]
        if name in lowered and (plus or lowered.index(name) == len(groups) - 1):
            first = lowered.index(name)
            return [b for b, stage in zip(blocks, stages) if groups.index(stage) >= first]
        if not blocks:
            raise UsageError(f"this backbone has no blocks that can be unfrozen (--unfreeze {value!r})")
        words = [groups[-1], *(f"{g}+" for g in reversed(groups[-3:-1]))]
        raise UsageError(f"--unfreeze {value!r} is not understood; use {', '.join(words)} or a number "
                         f"of trailing blocks from 1 to {len(blocks)}")


def stage_of(block: str) -> str:
    """The stage a block path belongs to, as `--unfreeze` names it: the first numbered
    component above the block's own index ("features.net.stages.3.blocks.1" and
    "features.net.stages.3.downsample.1" -> stages.3, "features.net.blocks.6.0" -> blocks.6),
    else the parent's name ("layer4.1" -> layer4, "blocks.11" -> blocks); a block without
    a parent is its own stage."""
    parts = block.split(".")
    for index in range(len(parts) - 2):
        if parts[index + 1].isdigit():
            return f"{parts[index]}.{parts[index + 1]}"
    return parts[-2] if len(parts) > 1 else block


class StagedBackbone(nn.Module):
    """A network cut into the stages of its description; `forward` returns the requested taps.

    `forward_from(tap, activations)` runs the stages after `tap`, which is how the finetune
    fast path trains from cached activations. `network` (the whole network, classifier
    stripped when built by `build_network`) and `description` are plain attributes: the
    stages share its modules, so its state dict has the checkpoint's own names. A dotted
    stage name ("blocks.3") is registered under its path (`blocks` holds `3`), so a stage
    may be one item of a container and still be a block path of its own.
    """

    def __init__(self, network: nn.Module, description: FeatureDescription | None = None) -> None:
        super().__init__()
        if description is None:  # ResNets are the default
            from .resnet import RESNET

            description = RESNET
        object.__setattr__(self, "description", description)
        object.__setattr__(self, "network", network)
        names = []
        for name, module in description.stages(network):
            parent, _, leaf = name.rpartition(".")
            holder = self
            for part in parent.split(".") if parent else ():
                if not hasattr(holder, part):
                    holder.add_module(part, nn.Sequential())
                holder = getattr(holder, part)
            holder.add_module(leaf, module)
            names.append(name)
        self.stage_names = tuple(names)
        self._stage_of = {t.name: t.stage for t in description.taps}
        self._reads = {t.name: t.reads for t in description.taps}
        readouts = {t.name: t.readout(network) for t in description.taps if t.readout is not None}
        if readouts:
            self.readouts = nn.ModuleDict(readouts)
        self._taps_at = {name: [t.name for t in description.taps if t.stage == name] for name in names}

    def stage(self, name: str) -> nn.Module:
        return self.get_submodule(name)

    def stages(self) -> list[tuple[str, nn.Module]]:
        return [(name, self.stage(name)) for name in self.stage_names]

    def stage_index(self, name: str) -> int:
        return self.stage_names.index(name)

    def block_stage(self, block: str) -> int:
        """Index of the stage holding a block path: the stage named by the path or by its
        longest leading part ("layer4.1" -> layer4, "blocks.3" -> blocks.3 where each ViT block
        is a stage, "features.net.stages.3.blocks.1" -> features)."""
        parts = block.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in self.stage_names:
                return self.stage_index(".".join(parts[:end]))
        raise BackboneError(f"block {block!r} is in no stage of this backbone ({', '.join(self.stage_names)})")

    def tap_index(self, tap: str) -> int:
        """Index of the stage a tap reads."""
        return self.stage_names.index(self._stage_of[tap])

    def read(self, tap: str, x: torch.Tensor, kept: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """A tap's value from its stage's output (and `kept`: the outputs of the stages it `reads`)."""
        if tap in self._readout_names():
            return self.readouts[tap](*(kept[s] for s in self._reads[tap]), x)
        return x

    def _readout_names(self) -> tuple[str, ...]:
        return tuple(self.readouts.keys()) if hasattr(self, "readouts") else ()

    def run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Stages start..stop-1 (indices into `stage_names`)."""
        for name in self.stage_names[start:stop]:
            x = self.stage(name)(x)
        return x

    def forward(self, x: torch.Tensor, taps: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        wanted = set(self.description.default_taps if taps is None else taps)
        deepest = max(self.tap_index(t) for t in wanted)
        keep = {s for t in wanted for s in self._reads[t]}
        out: dict[str, torch.Tensor] = {}
        kept: dict[str, torch.Tensor] = {}
        for name in self.stage_names[: deepest + 1]:
            x = self.stage(name)(x)
            if name in keep:
                kept[name] = x
            for tap in self._taps_at[name]:
                if tap in wanted:
                    out[tap] = self.read(tap, x, kept)
        return out

    def input_tap(self, stage: int) -> str | None:
        """The resumable tap holding the input of stage index `stage` (None: no such tap)."""
        if stage <= 0:
            return None
        before = self.stage_names[stage - 1]
        return next((t.name for t in self.description.taps if t.stage == before and t.resumable), None)

    def forward_from(self, tap: str, x: torch.Tensor, until: str | None = None) -> torch.Tensor:
        """Run the stages after `tap` up to and including `until`'s (default: the final tap)."""
        until = until or self.description.final_tap
        if not self.description.tap(tap).resumable:
            raise BackboneError(f"the network cannot run on from tap {tap!r} (it is a readout, not a stage output)")
        if self._reads[until]:  # it also reads stages before `tap`, which this run does not have
            raise BackboneError(f"tap {until!r} reads earlier stages' outputs; it cannot end a run from tap {tap!r}")
        x = self.run(x, self.tap_index(tap) + 1, self.tap_index(until) + 1)
        return self.read(until, x)

    def up_to(self, tap: str) -> nn.Module:
        """One module: input -> the tap's value (what export traces)."""
        return _UpTo(self, tap)


class _UpTo(nn.Module):
    def __init__(self, staged: StagedBackbone, tap: str) -> None:
        super().__init__()
        stop = staged.tap_index(tap) + 1
        self.stages = nn.Sequential(*[staged.stage(name) for name in staged.stage_names[:stop]])
        self.keep = [staged.stage_index(s) for s in staged.description.tap(tap).reads]
        self.readout = staged.readouts[tap] if tap in staged._readout_names() else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in self.keep:
                kept.append(x)
        return self.readout(*kept, x)


class ChildrenDescription(FeatureDescription):
    """A description for a network whose forward is its named children run in order
    (or a chosen list of them): the common case of a small custom backbone.

    `stage_paths` name the children (dotted paths allowed; stage names replace dots with
    underscores), `taps` read their outputs, `block_stages` are the stages whose items (an
    `nn.Sequential`'s children) or whole selves (other modules) can be unfrozen."""

    def __init__(self, *, stage_paths: Sequence[str], taps: Sequence[Tap], block_stages: Sequence[str] = (),
                 classifier_prefixes: Sequence[str] = (), classifier: str | None = None,
                 final_tap: str = "pool") -> None:
        self.stage_paths = tuple(stage_paths)
        self.taps = tuple(taps)
        self.block_stages = tuple(block_stages)
        self.classifier_prefixes = tuple(classifier_prefixes)
        self.classifier = classifier
        self.final_tap = final_tap

    @staticmethod
    def stage_name(path: str) -> str:
        return path.replace(".", "_")

    def stages(self, network: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(self.stage_name(p), network.get_submodule(p)) for p in self.stage_paths]

    def blocks(self, staged: StagedBackbone) -> list[str]:
        out = []
        for stage in self.block_stages:
            module = getattr(staged, stage)
            if isinstance(module, nn.Sequential):
                out += [f"{stage}.{i}" for i in range(len(module))]
            else:
                out.append(stage)
        return out

    def strip_classifier(self, network: nn.Module) -> nn.Module:
        if self.classifier and isinstance(getattr(network, self.classifier, None), nn.Module):
            setattr(network, self.classifier, nn.Identity())
        return network
