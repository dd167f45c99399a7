"""Each kind of backbone the timm issue names goes through the same commands: extract,
fit-head, finetune (its default --unfreeze), predict and export, with random weights at
small input sizes: a DINOv2 ViT (with registers), a CLIP image tower, a ConvNeXt and an EfficientNet
(timm's), and torchvision's EfficientNet. Predict on the images equals the head on the
cached features; the exported file equals predict; the finetuned run trains only what
its default --unfreeze names (a ViT's last block, a ConvNet's last stage) and its
predictor equals its own exported file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("timm")

from featurecache import extract, open_cache  # noqa: E402
from featurecache.backbones.preprocess import prepare_image  # noqa: E402
from featurecache.data.images import load_rgb  # noqa: E402
from featurecache.extract.stage import ExtractSpec  # noqa: E402
from featurecache.finetune.stage import FinetuneSpec, finetune, load_finetuned_predictor  # noqa: E402
from featurecache.fit.headstore import load_head  # noqa: E402
from featurecache.fit.stage import FitSpec, fit_head  # noqa: E402
from featurecache.serve.export import export_model  # noqa: E402
from featurecache.serve.predict import load_predictor, predict  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KINDS = {  # model: (input size, the blocks its default --unfreeze trains)
    "timm:vit_small_patch14_reg4_dinov2": (28, ["blocks.11"]),  # with register tokens
    "timm:vit_xsmall_patch16_clip_224": (32, ["blocks.9"]),
    "timm:convnext_atto": (32, [f"features.net.stages.3.{m}" for m in ("downsample.0", "downsample.1", "blocks.0",
                                                                      "blocks.1")]),
    "timm:efficientnet_b0": (32, ["features.net.blocks.6.0", "features.net.conv_head", "features.net.bn2"]),
    "torchvision:efficientnet_b0": (32, ["features_8"]),
}


def _probabilities(predictor, files, classes) -> np.ndarray:
    return np.array([[dict(r.top)[c] for c in classes] for r in predict(predictor, files, top_k=len(classes))])


def _exported(predictor, path, images) -> np.ndarray:
    with torch.no_grad():
        return torch.jit.load(str(export_model(predictor, path)))(images).numpy()


@pytest.mark.parametrize("model", list(KINDS))
def test_extract_fit_finetune_predict_export(model, image_folder, tmp_path):
    size, expected_blocks = KINDS[model]
    result = extract(ExtractSpec(source=str(image_folder), model=model, weights="random", image_size=size,
                                 precision="fp32", dtype="float32", batch_size=8, workers=0, root=str(tmp_path / "c"),
                                 optimize="eager"))
    cache = open_cache(result.path)
    fit_head(cache, FitSpec(head="logistic", name="logistic"))
    files = [image_folder / p for p in cache.paths("val")]

    predictor = load_predictor(cache, "logistic")
    got = _probabilities(predictor, files, cache.classes)
    head, _ = load_head(cache, "logistic")
    np.testing.assert_allclose(got, head.predict_proba(cache.features("val")), atol=1e-5)
    images = torch.stack([prepare_image(load_rgb(f), predictor.preprocessing) for f in files])
    np.testing.assert_allclose(_exported(predictor, tmp_path / "head.pt", images), got, atol=1e-5)

    run = finetune(cache, FinetuneSpec(head="logistic", epochs=1, batch_size=8, workers=0, precision="fp32",
                                       device="cpu", hflip=False, backbone_lr=0.05, lr=0.05))
    trainable = run.record["trainable_blocks"]
    assert trainable == expected_blocks, trainable
    checkpoint = load_file(str(run.path / "checkpoint.safetensors"))
    trained = [k[len("model.backbone."):] for k in checkpoint if k.startswith("model.backbone.")]
    assert trained and all(any(k.startswith(block + ".") for block in trainable) for k in trained), trained
    tuned = load_finetuned_predictor(cache, run.name)
    tuned_probabilities = _probabilities(tuned, files, cache.classes)
    np.testing.assert_allclose(_exported(tuned, tmp_path / "tuned.pt", images), tuned_probabilities, atol=1e-5)
