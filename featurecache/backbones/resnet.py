"""The ResNet family's feature description: the only place that knows ResNet internals.

A torchvision ResNet (and any network with its attributes: conv1, bn1, relu, maxpool,
layer1..layer4, avgpool, fc) is cut into the stages stem, layer1..layer4, pool; its taps
are their outputs, its unfreezable blocks the residual blocks `layerN.i`.
"""

from __future__ import annotations

from torch import nn

from .description import FeatureDescription, StagedBackbone, Tap

#: Taps in forward order; each is the output of the stage with that name.
TAP_ORDER = ("layer1", "layer2", "layer3", "layer4", "pool")
#: Input size / spatial size of each layer's output, for a network that downsamples 32x.
_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
BASIC_CHANNELS = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512, "pool": 512}
BOTTLENECK_CHANNELS = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048, "pool": 2048}


class ResNetDescription(FeatureDescription):
    classifier_prefixes = ("fc.",)
    default_unfreeze = "layer4"

    def __init__(self, tap_channels: dict[str, int] | None = None, downsampling: int = 32) -> None:
        channels = tap_channels or BASIC_CHANNELS
        self.taps = tuple(
            Tap(name=name, stage=name, channels=channels[name],
                stride=None if name == "pool" else max(1, _STRIDES[name] * downsampling // 32))
            for name in TAP_ORDER if name in channels)

    def stages(self, network: nn.Module) -> list[tuple[str, nn.Module]]:
        stem = nn.Sequential(network.conv1, network.bn1, network.relu, network.maxpool)
        pool = nn.Sequential(network.avgpool, nn.Flatten(1))
        return [("stem", stem), *((name, getattr(network, name)) for name in TAP_ORDER[:4]), ("pool", pool)]

    def blocks(self, staged: StagedBackbone) -> list[str]:
        return [f"{stage}.{i}" for stage in TAP_ORDER[:4] for i in range(len(getattr(staged, stage)))]

    def strip_classifier(self, network: nn.Module) -> nn.Module:
        if isinstance(getattr(network, "fc", None), nn.Module):
            network.fc = nn.Identity()  # never loaded, never used: the backbone ends at the pool
        return network

    def fold_pairs(self, module: nn.Module) -> list[tuple[str, str]]:
        # torchvision's residual blocks: convN is followed by bnN (the tracer finds these
        # too; listed so folding does not depend on tracing succeeding).
        return [(name, "bn" + name[4:]) for name, _ in module.named_children() if name.startswith("conv")]


#: The description of torchvision's resnet18/34 shape (and the default for StagedBackbone).
RESNET = ResNetDescription()


def resnet_description(tap_channels: dict[str, int], downsampling: int = 32) -> ResNetDescription:
    return ResNetDescription(tap_channels, downsampling)


def register_torchvision_resnets(register) -> None:
    from torchvision import models

    from .registry import BackboneEntry

    for name, enum_name, channels in [
        ("resnet18", "ResNet18_Weights", BASIC_CHANNELS),
        ("resnet34", "ResNet34_Weights", BASIC_CHANNELS),
        ("resnet50", "ResNet50_Weights", BOTTLENECK_CHANNELS),
        ("resnet101", "ResNet101_Weights", BOTTLENECK_CHANNELS),
        ("resnet152", "ResNet152_Weights", BOTTLENECK_CHANNELS),
        ("wide_resnet50_2", "Wide_ResNet50_2_Weights", BOTTLENECK_CHANNELS),
        ("resnext50_32x4d", "ResNeXt50_32X4D_Weights", BOTTLENECK_CHANNELS),
    ]:
        builder = getattr(models, name)
        register(BackboneEntry(name=name, build=lambda builder=builder: builder(weights=None),
                               description=ResNetDescription(channels), weights_enum=getattr(models, enum_name)))
