"""`--unfreeze STAGE` names stages the same way for every family: ResNet's layer4, a timm
ConvNeXt's stages.3, an EfficientNet's blocks.6, a ViT's blocks."""

import pytest
import torch

from featurecache.backbones.description import stage_of
from featurecache.backbones.registry import get_backbone, staged_backbone
from featurecache.errors import UsageError
from featurecache.finetune.stage import parse_unfreeze


@pytest.mark.parametrize("block, stage", [
    ("layer4.1", "layer4"), ("features.net.layer4.0", "layer4"), ("features.net.stages.3.blocks.1", "stages.3"),
    ("features.net.stages.3.downsample.1", "stages.3"), ("features.net.blocks.6.0", "blocks.6"),
    ("blocks.11", "blocks"), ("features_8", "features_8"), ("features.net.conv_head", "net")])
def test_stage_of_a_block_path(block, stage):
    assert stage_of(block) == stage


def _staged(model: str):
    entry = get_backbone(model)
    with torch.device("meta"):
        return staged_backbone(entry, entry.build())


def test_timm_convnext_and_resnet_stages_by_name():
    staged = _staged("timm:convnext_atto")
    last = parse_unfreeze(staged, "stages.3")
    assert last[-1] == "features.net.stages.3.blocks.1" and all(".stages.3." in b for b in last)
    both = parse_unfreeze(staged, "stages.2+")
    assert both[-len(last):] == last and any(".stages.2." in b for b in both)
    assert all(".stages.2." in b or ".stages.3." in b for b in both)
    with pytest.raises(UsageError, match="stages.3, stages.2\\+"):
        parse_unfreeze(staged, "stages.2")  # not trailing without +
    assert parse_unfreeze(_staged("timm:resnet18"), "layer4") == ["features.net.layer4.0", "features.net.layer4.1"]
    assert parse_unfreeze(_staged("resnet18"), "layer3+") == ["layer3.0", "layer3.1", "layer4.0", "layer4.1"]
