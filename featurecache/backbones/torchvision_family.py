"""Other torchvision classifiers as backbones: `--model torchvision:NAME`.

Models built as `features` (an `nn.Sequential`) then `avgpool` then `classifier`
(MobileNet V2/V3, EfficientNet V1/V2, ConvNeXt, VGG, ...) are cut into one stage per item
of `features` (taps `features_0`, `features_1`, ..., each a feature map, and its blocks
the units that `--unfreeze` counts) and `pool` (the average pool, flattened). Shapes are
found by running the network on the meta device (no computation). Weights: `random`,
a file, or the model's torchvision weights enum (`imagenet` = its DEFAULT weights, from
torch hub's cache; a download only where FEATURECACHE_OFFLINE is unset).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import BackboneError
from .description import FeatureDescription, StagedBackbone, Tap

PREFIX = "torchvision"


class TorchvisionDescription(FeatureDescription):
    classifier_prefixes = ("classifier.",)

    def __init__(self, network: nn.Module, build) -> None:
        self.build = build
        self.count = len(network.features)
        names = [f"features_{i}" for i in range(self.count)] + ["pool"]
        self.taps = tuple(Tap(name=n, stage=n, channels=0) for n in names)  # provisional: to find the shapes
        width = self._shapes(network, 64)
        self.taps = tuple(
            [Tap(name=f"features_{i}", stage=f"features_{i}", channels=width[f"features_{i}"][0],
                 shape=functools.partial(self.tap_shape_at, f"features_{i}")) for i in range(self.count)]
            + [Tap(name="pool", stage="pool", channels=width["pool"][0])])

    def stages(self, network: nn.Module) -> list[tuple[str, nn.Module]]:
        return [*((f"features_{i}", block) for i, block in enumerate(network.features)),
                ("pool", nn.Sequential(network.avgpool, nn.Flatten(1)))]

    def blocks(self, staged: StagedBackbone) -> list[str]:
        return [f"features_{i}" for i in range(self.count)]

    def strip_classifier(self, network: nn.Module) -> nn.Module:
        network.classifier = nn.Identity()
        return network

    @functools.lru_cache(maxsize=64)
    def _shapes_at(self, crop_size: int) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            network = self.build()
        return self._shapes(network, crop_size)

    def _shapes(self, network: nn.Module, crop_size: int) -> dict[str, tuple[int, ...]]:
        staged = StagedBackbone(network, self).eval()
        names = [f"features_{i}" for i in range(len(network.features))] + ["pool"]
        with torch.no_grad():
            out = staged(torch.empty(1, 3, crop_size, crop_size, device="meta"), names)
        return {name: tuple(value.shape[1:]) for name, value in out.items()}

    def tap_shape_at(self, tap: str, crop_size: int) -> tuple[int, ...]:
        return self._shapes_at(crop_size)[tap]


def resolve(name: str):
    from torchvision import models

    from .registry import BackboneEntry

    model_name = name.strip().lower()
    try:
        builder = models.get_model_builder(model_name)
    except ValueError:
        raise BackboneError(f"unknown torchvision model {model_name!r}; see torchvision.models.list_models()") from None
    build = functools.partial(builder, weights=None)
    with torch.device("meta"):
        network = build()
    if not (isinstance(getattr(network, "features", None), nn.Sequential) and hasattr(network, "avgpool")
            and hasattr(network, "classifier")):
        raise BackboneError(f"torchvision:{model_name} is not built as features, avgpool, classifier; use one "
                            "that is (mobilenet_v3_small, efficientnet_b0, convnext_tiny, ...) or timm:NAME")
    try:
        enum = models.get_model_weights(model_name)
    except (ValueError, KeyError):
        enum = None
    return BackboneEntry(name=f"{PREFIX}:{model_name}", build=build, description=TorchvisionDescription(network, build),
                         weights_enum=enum)
