"""Backbones: a registry of architectures, their taps, and their preprocessing.

A backbone is a torchvision ResNet-shaped network (stem, layer1..layer4, avgpool) cut
into stages, so one forward pass can return several taps and the finetune stage can
start from an intermediate tap. Weights are resolved in `weights.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BackboneError

#: Taps in forward order; each is the output of the stage with that name.
TAP_ORDER = ("layer1", "layer2", "layer3", "layer4", "pool")
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

    def with_image_size(self, size: int) -> "Preprocessing":
        """Override the input size, keeping the weights' resize/crop ratio."""
        if size < 16:
            raise BackboneError(f"--image-size {size} is too small; use at least 16 pixels")
        resize = int(math.floor(size * self.resize_size / self.crop_size + 0.5))
        return dataclasses.replace(self, crop_size=size, resize_size=resize)

    def to_dict(self) -> dict:
        return {
            "resize_size": self.resize_size,
            "crop_size": self.crop_size,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(
            resize_size=int(data["resize_size"]),
            crop_size=int(data["crop_size"]),
            interpolation=str(data.get("interpolation", "bilinear")),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )


IMAGENET_PREPROCESSING = Preprocessing(resize_size=256, crop_size=224)


@dataclass(frozen=True, kw_only=True)
class BackboneEntry:
    """A registered architecture: how to build it and what its taps look like."""

    name: str
    build: Callable[[], nn.Module]  # returns an untrained ResNet-shaped module
    tap_channels: dict[str, int]  # channels of each tap's output
    weights_enum: type | None = None  # torchvision weights enum, if any
    downsampling: int = 32  # input size / layer4 spatial size


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(entry: BackboneEntry) -> None:
    """Add an architecture; refuses a name that is already registered."""
    if entry.name in _REGISTRY:
        raise ValueError(f"backbone {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry


def unregister_backbone(name: str) -> None:
    _REGISTRY.pop(name, None)


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneEntry:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise BackboneError(
            f"unknown model {name!r}; choose one of: {', '.join(available_backbones())}"
        ) from None


def _register_torchvision_resnets() -> None:
    from torchvision import models

    bottleneck = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048, "pool": 2048}
    basic = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512, "pool": 512}
    for name, enum_name, channels in [
        ("resnet18", "ResNet18_Weights", basic),
        ("resnet34", "ResNet34_Weights", basic),
        ("resnet50", "ResNet50_Weights", bottleneck),
        ("resnet101", "ResNet101_Weights", bottleneck),
        ("resnet152", "ResNet152_Weights", bottleneck),
        ("wide_resnet50_2", "Wide_ResNet50_2_Weights", bottleneck),
        ("resnext50_32x4d", "ResNeXt50_32X4D_Weights", bottleneck),
    ]:
        builder = getattr(models, name)
        register_backbone(
            BackboneEntry(
                name=name,
                build=lambda builder=builder: builder(weights=None),
                tap_channels=channels,
                weights_enum=getattr(models, enum_name),
            )
        )


_register_torchvision_resnets()


def validate_taps(entry: BackboneEntry, taps: Sequence[str]) -> tuple[str, ...]:
    """Return the taps in forward order, refusing unknown or repeated ones."""
    if not taps:
        raise BackboneError("no --tap given; use pool (the default), layer3 or layer4")
    unknown = [t for t in taps if t not in entry.tap_channels]
    if unknown:
        raise BackboneError(
            f"unknown tap {unknown[0]!r} for {entry.name}; choose from: "
            + ", ".join(t for t in TAP_ORDER if t in entry.tap_channels)
        )
    return tuple(t for t in TAP_ORDER if t in set(taps))


def tap_shape(entry: BackboneEntry, tap: str, crop_size: int) -> tuple[int, ...]:
    """Per-image shape of a tap's output at a given input size."""
    channels = entry.tap_channels[tap]
    if tap == "pool":
        return (channels,)
    stride = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}[tap]
    side = math.ceil(crop_size / stride)
    return (channels, side, side)


class StagedBackbone(nn.Module):
    """A ResNet cut into named stages; `forward` returns the requested taps.

    `forward_from(tap, activations)` runs the stages after `tap`, which is how the
    finetune fast path trains from cached layer3 outputs.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(network.conv1, network.bn1, network.relu, network.maxpool)
        self.layer1, self.layer2 = network.layer1, network.layer2
        self.layer3, self.layer4 = network.layer3, network.layer4
        self.pool = nn.Sequential(network.avgpool, nn.Flatten(1))

    def stages(self) -> list[tuple[str, nn.Module]]:
        return [(name, getattr(self, name)) for name in TAP_ORDER]

    def forward(self, x: torch.Tensor, taps: Sequence[str] = DEFAULT_TAPS) -> dict[str, torch.Tensor]:
        wanted = set(taps)
        deepest = max(TAP_ORDER.index(t) for t in wanted)
        out: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        for name, stage in self.stages()[: deepest + 1]:
            x = stage(x)
            if name in wanted:
                out[name] = x
        return out

    def forward_from(self, tap: str, x: torch.Tensor, until: str = "pool") -> torch.Tensor:
        """Run the stages after `tap` up to and including `until`."""
        start, stop = TAP_ORDER.index(tap) + 1, TAP_ORDER.index(until) + 1
        for _, stage in self.stages()[start:stop]:
            x = stage(x)
        return x


def state_fits(entry: BackboneEntry, state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict has exactly the backbone's tensor names and shapes (fc ignored)."""
    with torch.device("meta"):
        network = entry.build()
    def shapes(state: dict) -> dict:  # old checkpoints lack BatchNorm's num_batches_tracked
        return {k: tuple(v.shape) for k, v in state.items()
                if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}

    return shapes(network.state_dict()) == shapes(state_dict)


def build_network(entry: BackboneEntry, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Build the full torchvision network and load a backbone state dict (fc ignored).

    The network is made on the meta device and the state's tensors are assigned to it:
    no random initialisation that the load would overwrite (0.2 s for ResNet50 on CPU)."""
    with torch.device("meta"):
        network = entry.build()
    if isinstance(getattr(network, "fc", None), nn.Module):
        network.fc = nn.Identity()  # never loaded, never used: the backbone ends at the pool
    state = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = network.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # same names, other shapes (e.g. resnet50 vs wide_resnet50_2)
        raise BackboneError(f"these weights do not fit {entry.name} ({str(error).splitlines()[-1].strip()[:160]}); "
                            "pass --model matching the checkpoint") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        problem = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise BackboneError(
            f"these weights do not fit {entry.name} ({problem}); pass --model matching the checkpoint"
        )
    return network


def backbone_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """The weights that define the features: everything except the classifier."""
    return {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items() if not k.startswith("fc.")}
