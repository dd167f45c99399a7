"""Backbones: a registry of architectures, each with its feature description, and preprocessing.

Each entry builds a network and describes it (`description.py`): its taps, their shapes,
its unfreezable blocks and its stages, so one forward pass can return several taps and
the finetune stage can start from an intermediate tap. The ResNet family lives in
`resnet.py`; weights are resolved in `weights.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BackboneError
from .description import FeatureDescription, StagedBackbone  # noqa: F401  (re-exported)

DEFAULT_TAPS = ("pool",)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """How an image becomes the network's input; part of the cache key."""

    resize_size: int  # the shorter side is resized (up or down) to this many pixels
    crop_size: int  # then the centre crop_size x crop_size square is taken
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # timm's data config, recorded (and so in the key) only when it came from one:
    crop_pct: float | None = None  # resize_size = floor(crop_size / crop_pct)
    crop_mode: str | None = None  # center (shorter side resized), squash (both) or border (longer, padded)

    def with_image_size(self, size: int) -> "Preprocessing":
        """Override the input size, keeping the weights' resize/crop ratio."""
        if size < 16:
            raise BackboneError(f"--image-size {size} is too small; use at least 16 pixels")
        if self.crop_pct is not None:  # timm's rule for an input_size override
            resize = int(math.floor(size / self.crop_pct))
        else:
            resize = int(math.floor(size * self.resize_size / self.crop_size + 0.5))
        return dataclasses.replace(self, crop_size=size, resize_size=resize)

    def to_dict(self) -> dict:
        return {
            "resize_size": self.resize_size,
            "crop_size": self.crop_size,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            **({"crop_pct": self.crop_pct} if self.crop_pct is not None else {}),
            **({"crop_mode": self.crop_mode} if self.crop_mode is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(
            resize_size=int(data["resize_size"]),
            crop_size=int(data["crop_size"]),
            interpolation=str(data.get("interpolation", "bilinear")),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            crop_pct=None if data.get("crop_pct") is None else float(data["crop_pct"]),
            crop_mode=None if data.get("crop_mode") is None else str(data["crop_mode"]),
        )


IMAGENET_PREPROCESSING = Preprocessing(resize_size=256, crop_size=224)


@dataclass(frozen=True, kw_only=True)
class BackboneEntry:
    """A registered architecture: how to build it and its feature description.

    `tap_channels` (with `downsampling`) is a shorthand for ResNet-shaped networks: it
    builds the ResNet description; any other network passes `description`."""

    name: str
    build: Callable[[], nn.Module]  # returns an untrained network
    tap_channels: dict[str, int] | None = None  # ResNet shorthand: channels of each tap's output
    weights_enum: type | None = None  # torchvision weights enum, if any
    downsampling: int = 32  # ResNet shorthand: input size / deepest layer's spatial size
    description: FeatureDescription | None = None
    preprocessing: Preprocessing = IMAGENET_PREPROCESSING  # for random weights and files without their own
    #: The default pretrained weights' local file: () -> (path, tag); None: torchvision's weights enum.
    pretrained: Callable[[], tuple] | None = None

    def __post_init__(self) -> None:
        if self.description is None:
            if self.tap_channels is None:
                raise ValueError(f"backbone {self.name!r} needs a description (or ResNet tap_channels)")
            from .resnet import resnet_description

            object.__setattr__(self, "description", resnet_description(self.tap_channels, self.downsampling))
        elif self.tap_channels is None:
            object.__setattr__(self, "tap_channels", {t.name: t.channels for t in self.description.taps})


_REGISTRY: dict[str, BackboneEntry] = {}
#: Resolvers for prefixed names ("timm:NAME"): prefix -> (name -> BackboneEntry).
_FAMILIES: dict[str, Callable[[str], BackboneEntry]] = {}


def register_backbone(entry: BackboneEntry) -> None:
    """Add an architecture; refuses a name that is already registered."""
    if entry.name in _REGISTRY:
        raise ValueError(f"backbone {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry


def unregister_backbone(name: str) -> None:
    _REGISTRY.pop(name, None)


def register_family(prefix: str, resolve: Callable[[str], BackboneEntry]) -> None:
    """Names `PREFIX:NAME` are resolved (lazily, once) by `resolve(NAME)`."""
    _FAMILIES[prefix] = resolve


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneEntry:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        pass
    prefix, _, rest = name.partition(":")
    if rest and prefix.lower() in _FAMILIES:
        entry = _FAMILIES[prefix.lower()](rest)
        _REGISTRY.setdefault(entry.name, entry)
        return _REGISTRY[entry.name]
    families = "".join(f", {p}:NAME" for p in sorted(_FAMILIES))
    raise BackboneError(f"unknown model {name!r}; choose one of: {', '.join(available_backbones())}{families}")


def validate_taps(entry: BackboneEntry, taps: Sequence[str]) -> tuple[str, ...]:
    """Return the taps in forward order, refusing unknown or repeated ones."""
    order = entry.description.tap_names
    if not taps:
        raise BackboneError(f"no --tap given; use {entry.description.default_taps[0]} (the default) or one of: "
                            + ", ".join(order))
    unknown = [t for t in taps if t not in order]
    if unknown:
        raise BackboneError(f"unknown tap {unknown[0]!r} for {entry.name}; choose from: " + ", ".join(order))
    return tuple(t for t in order if t in set(taps))


def tap_shape(entry: BackboneEntry, tap: str, crop_size: int) -> tuple[int, ...]:
    """Per-image shape of a tap's output at a given input size."""
    return entry.description.tap_shape(tap, crop_size)


def state_fits(entry: BackboneEntry, state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict has exactly the backbone's tensor names and shapes (classifier ignored)."""
    with torch.device("meta"):
        network = entry.build()
    def shapes(state: dict) -> dict:  # old checkpoints lack BatchNorm's num_batches_tracked
        return {k: tuple(v.shape) for k, v in entry.description.backbone_state(state).items()
                if not k.endswith("num_batches_tracked")}

    return shapes(network.state_dict()) == shapes(state_dict)


def build_network(entry: BackboneEntry, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Build the full network and load a backbone state dict (classifier ignored).

    The network is made on the meta device and the state's tensors are assigned to it:
    no random initialisation that the load would overwrite (0.2 s for ResNet50 on CPU)."""
    with torch.device("meta"):
        network = entry.build()
    network = entry.description.strip_classifier(network)
    state = entry.description.backbone_state(state_dict)
    try:
        missing, unexpected = network.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # same names, other shapes (e.g. resnet50 vs wide_resnet50_2)
        raise BackboneError(f"these weights do not fit {entry.name} ({str(error).splitlines()[-1].strip()[:160]}); "
                            "pass --model matching the checkpoint") from None
    missing = [k for k in missing if not entry.description.is_classifier_key(k)]
    if missing or unexpected:
        problem = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise BackboneError(
            f"these weights do not fit {entry.name} ({problem}); pass --model matching the checkpoint"
        )
    return network


def staged_backbone(entry: BackboneEntry, network: nn.Module) -> StagedBackbone:
    return StagedBackbone(network, entry.description)


def backbone_state_dict(network: nn.Module, description: FeatureDescription | None = None) -> dict[str, torch.Tensor]:
    """The weights that define the features: everything except the classifier."""
    if description is None:
        from .resnet import RESNET

        description = RESNET
    return {k: v.detach().cpu().contiguous() for k, v in description.backbone_state(network.state_dict()).items()}


from .resnet import register_torchvision_resnets  # noqa: E402  (the family needs BackboneEntry)

register_torchvision_resnets(register_backbone)


def _timm_entry(name: str) -> BackboneEntry:
    from .timm_family import resolve  # imports timm: only for timm: models

    return resolve(name)


def _torchvision_entry(name: str) -> BackboneEntry:
    from .torchvision_family import resolve

    return resolve(name)


register_family("timm", _timm_entry)
register_family("torchvision", _torchvision_entry)
