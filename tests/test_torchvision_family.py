"""`--model torchvision:NAME`: a torchvision classifier other than a ResNet, through its description."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torchvision import models

from featurecache import extract, open_cache
from featurecache.backbones.preprocess import normalize_batch, prepare_image
from featurecache.backbones.registry import Preprocessing, get_backbone
from featurecache.data.images import load_rgb
from featurecache.errors import BackboneError
from featurecache.extract.stage import ExtractSpec
from featurecache.finetune.stage import FinetuneSpec, build_model, finetune
from featurecache.fit.stage import FitSpec, fit_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MODEL = "mobilenet_v3_small"


def _spec(folder, root, **changes) -> ExtractSpec:
    base = dict(source=str(folder), model=f"torchvision:{MODEL}", weights="random", image_size=32, precision="fp32",
                dtype="float32", batch_size=4, workers=0, root=str(root), taps=("pool", "features_12", "features_8"))
    return ExtractSpec(**{**base, **changes})


def test_describes_the_network():
    entry = get_backbone(f"torchvision:{MODEL}")
    assert entry.description.tap_names[-1] == "pool" and entry.description.tap_names[0] == "features_0"
    network = models.get_model(MODEL, weights=None).eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        for i in (0, 8, 12):
            shape = tuple(network.features[: i + 1](x).shape[1:])
            assert entry.description.tap_shape(f"features_{i}", 48) == shape
    assert entry.description.tap_shape("pool", 48) == (576,)
    with pytest.raises(BackboneError, match="unknown torchvision model"):
        get_backbone("torchvision:no_such_net")


@pytest.mark.parametrize("optimize", ["eager", "fuse"])
def test_features_equal_the_network_and_last_block_finetunes(image_folder, tmp_path, optimize):
    cache = open_cache(extract(_spec(image_folder, tmp_path / "c", optimize=optimize)).path)
    state = load_file(str(cache.path.parent / "_weights" / f"{cache.manifest['weights']['sha256']}.safetensors"))
    network = models.get_model(MODEL, weights=None)
    missing, unexpected = network.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing)
    network.eval()
    pre = Preprocessing.from_dict(cache.manifest["config"]["preprocessing"])
    images = torch.stack([prepare_image(load_rgb(image_folder / p), pre) for p in cache.paths("train")])
    with torch.inference_mode():
        x = normalize_batch(images, pre, channels_last=False)
        late = network.features(x)
        expected = {"features_8": network.features[:9](x), "features_12": late,
                    "pool": torch.flatten(network.avgpool(late), 1)}
    for tap, values in expected.items():
        np.testing.assert_allclose(cache.features("train", tap), values.numpy(), rtol=1e-4, atol=1e-4)
    if optimize != "eager":
        return
    fit_head(cache, FitSpec(head="logistic", name="logistic"))
    spec = FinetuneSpec(head="logistic", unfreeze="1", epochs=1, batch_size=4, workers=0, precision="fp32",
                        device="cpu", hflip=False, from_cache=True)
    model, _, _ = build_model(cache, spec)
    assert model.trainable == ["features_12"] and model.input_tap == "features_11"
    with pytest.raises(Exception, match="features_11"):  # not cached: the error names the tap to add
        finetune(cache, spec)
    spec = FinetuneSpec(**{**spec.__dict__, "from_cache": False, "backbone_lr": 0.01})
    run = finetune(cache, spec)
    checkpoint = load_file(str(run.path / "checkpoint.safetensors"))
    trained = {k[len("model.backbone."):] for k in checkpoint if k.startswith("model.backbone.")}
    assert trained and all(k.startswith("features_12.") for k in trained)
    saved = load_file(str(run.path / "backbone.safetensors"))
    assert set(saved) == set(state)
    assert all(k.startswith("features.12.") for k in saved if not torch.equal(saved[k], state[k]))
