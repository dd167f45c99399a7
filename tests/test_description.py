"""A backbone that is not a ResNet, registered through its feature description, runs through every
stage: extract (several taps, one of them a readout), BatchNorm folding, fit-head, finetune of
its last block (images and the fast path from a cached tap), predict and export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from featurecache import extract, open_cache
from featurecache.backbones.description import ChildrenDescription, StagedBackbone, Tap
from featurecache.backbones.optimize import fold_batchnorm
from featurecache.backbones.preprocess import normalize_batch, prepare_image
from featurecache.backbones.registry import (BackboneEntry, Preprocessing, available_backbones, build_network,
                                             get_backbone, register_backbone, unregister_backbone)
from featurecache.data.images import load_rgb
from featurecache.errors import UsageError
from featurecache.extract.stage import ExtractSpec
from featurecache.finetune.stage import FinetuneSpec, build_model, finetune, load_finetuned_predictor, parse_unfreeze
from featurecache.fit.stage import FitSpec, fit_head
from featurecache.serve.export import export_model
from featurecache.serve.predict import load_predictor, predict


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Block(nn.Module):
    """A residual block with its own names (no convN/bnN, no layerN)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(channels, 2 * channels, 1, bias=False)
        self.norm_a = nn.BatchNorm2d(2 * channels)
        self.mix = nn.Conv2d(2 * channels, channels, 3, padding=1, groups=channels, bias=False)
        self.norm_b = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm_b(self.mix(torch.relu(self.norm_a(self.expand(x)))))


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(Block(8), Block(8))
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.gap(self.body(self.stem(x))))


def _max_readout(network: nn.Module) -> nn.Module:
    return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(1))


DESCRIPTION = ChildrenDescription(
    stage_paths=("stem", "body", "gap"),
    taps=(Tap(name="early", stage="stem", channels=8, stride=2),
          Tap(name="late", stage="body", channels=8, stride=2),
          Tap(name="peak", stage="body", channels=8, readout=_max_readout),
          Tap(name="pool", stage="gap", channels=8)),
    block_stages=("body",), classifier="classifier", classifier_prefixes=("classifier.",))

SETTINGS = dict(model="tinynet", weights="random", precision="fp32", dtype="float32", batch_size=4, workers=0,
                image_size=24, optimize="eager")


@pytest.fixture
def tinynet():
    if "tinynet" not in available_backbones():
        register_backbone(BackboneEntry(name="tinynet", build=TinyNet, description=DESCRIPTION))
    yield get_backbone("tinynet")
    unregister_backbone("tinynet")


def _direct(network: TinyNet, images: torch.Tensor, preprocessing: Preprocessing) -> dict[str, np.ndarray]:
    """The taps, computed by calling the network's own modules by hand."""
    with torch.inference_mode():
        x = normalize_batch(images, preprocessing, channels_last=False)
        early = network.stem(x)
        late = network.body(early)
        return {"early": early.numpy(), "late": late.numpy(), "peak": late.amax(dim=(2, 3)).numpy(),
                "pool": late.mean(dim=(2, 3)).numpy()}


def _images(cache, folder, split: str, preprocessing: Preprocessing) -> torch.Tensor:
    return torch.stack([prepare_image(load_rgb(folder / p), preprocessing) for p in cache.paths(split)])


def _network(cache) -> TinyNet:
    state = load_file(str(cache.path.parent / "_weights" / f"{cache.manifest['weights']['sha256']}.safetensors"))
    return build_network(get_backbone("tinynet"), state).eval()


def test_description_gives_taps_shapes_and_blocks(tinynet):
    assert tinynet.description.tap_names == ("early", "late", "peak", "pool")
    assert tinynet.description.tap_shape("late", 24) == (8, 12, 12)
    assert tinynet.description.tap_shape("peak", 24) == (8,)
    staged = StagedBackbone(TinyNet(), DESCRIPTION)
    assert staged.stage_names == ("stem", "body", "gap")
    assert parse_unfreeze(staged, "1") == ["body.1"]
    assert parse_unfreeze(staged, "blocks:2") == parse_unfreeze(staged, "body") == ["body.0", "body.1"]
    for bad in ("0", "3", "stem", "layer4"):
        with pytest.raises(UsageError):
            parse_unfreeze(staged, bad)
    assert staged.input_tap(staged.stage_index("body")) == "early"
    x = torch.randn(2, 3, 24, 24)
    out = staged(x, ("late", "pool"))
    torch.testing.assert_close(staged.forward_from("early", staged(x, ("early",))["early"]), out["pool"])
    torch.testing.assert_close(staged.up_to("late")(x), out["late"])
    # The classifier is not part of the backbone's weights.
    assert not any(k.startswith("classifier.") for k in tinynet.description.backbone_state(TinyNet().state_dict()))


def test_fold_batchnorm_is_generic():
    torch.manual_seed(0)
    staged = StagedBackbone(TinyNet(), DESCRIPTION).eval()
    for module in staged.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    folded = fold_batchnorm(staged)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # the block's expand/norm_a too
    assert sum(isinstance(m, nn.BatchNorm2d) for m in staged.modules()) == 5  # untouched
    x = torch.randn(3, 3, 24, 24)
    with torch.inference_mode():
        expected, got = staged(x, ("late", "peak", "pool")), folded(x, ("late", "peak", "pool"))
    for tap in expected:
        torch.testing.assert_close(got[tap], expected[tap], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimize", ["eager", "fuse", "freeze"])
def test_extract_equals_the_network_run_directly(tinynet, image_folder, tmp_path, optimize):
    result = extract(ExtractSpec(source=str(image_folder), taps=("pool", "peak", "late", "early"), root=str(tmp_path / "c"),
                                 **{**SETTINGS, "optimize": optimize}))
    cache = open_cache(result.path)
    assert cache.taps == ["early", "late", "peak", "pool"]
    assert cache.tap_shapes == {"early": (8, 12, 12), "late": (8, 12, 12), "peak": (8,), "pool": (8,)}
    preprocessing = Preprocessing.from_dict(cache.manifest["config"]["preprocessing"])
    for split in ("train", "val"):
        expected = _direct(_network(cache), _images(cache, image_folder, split, preprocessing), preprocessing)
        for tap, values in expected.items():
            np.testing.assert_allclose(cache.features(split, tap), values, rtol=1e-4, atol=1e-5)


def test_fit_finetune_predict_export(tinynet, image_folder, tmp_path):
    result = extract(ExtractSpec(source=str(image_folder), taps=("pool", "early"), root=str(tmp_path / "c"),
                                 **SETTINGS))
    cache = open_cache(result.path)
    fit_head(cache, FitSpec(head="logistic", name="logistic"))
    spec = FinetuneSpec(head="logistic", epochs=2, batch_size=4, workers=0, precision="fp32",
                        device="cpu", hflip=False, lr=0.05, backbone_lr=0.05)
    model, _, _ = build_model(cache, spec)
    assert model.trainable == ["body.1"] and model.input_tap == "early"
    before = {k: v.clone() for k, v in _network(cache).state_dict().items()}

    for from_cache in (False, True):
        run = finetune(cache, spec if not from_cache else FinetuneSpec(**{**spec.__dict__, "from_cache": True}))
        assert run.record["trainable_blocks"] == ["body.1"] and run.record["input_tap"] == "early"
        assert run.record["spec"]["unfreeze"] == "1" and run.name == "logistic-1" + ("-cache" if from_cache else "")
        saved = load_file(str(run.path / "backbone.safetensors"))
        assert set(saved) == set(before)  # the network's own names, no classifier
        changed = {k for k in saved if not torch.equal(saved[k], before[k])}
        assert all(k.startswith("body.1.") for k in changed), changed  # empty when epoch 0 stayed the best
        checkpoint = load_file(str(run.path / "checkpoint.safetensors"))  # the last epoch's trained state
        trained = {k[len("model.backbone."):]: v for k, v in checkpoint.items() if k.startswith("model.backbone.")}
        assert trained and all(k.startswith("body.1.") for k in trained), sorted(trained)
        assert any(not torch.equal(v, before[k]) for k, v in trained.items() if k.endswith("weight"))

        # The fine-tuned backbone loads back into the network; predict and export agree with it.
        predictor = load_finetuned_predictor(cache, run.name)
        network = build_network(get_backbone("tinynet"), saved).eval()
        files = [image_folder / p for p in cache.paths("val")]
        images = torch.stack([prepare_image(load_rgb(f), predictor.preprocessing) for f in files])
        direct = _direct(network, images, predictor.preprocessing)["pool"]
        np.testing.assert_allclose(predictor.features(images).numpy(), direct, rtol=1e-4, atol=1e-5)
        exported = torch.jit.load(str(export_model(predictor, tmp_path / f"model-{from_cache}.pt")))
        expected = np.array([[dict(r.top)[c] for c in cache.classes] for r in predict(predictor, files, top_k=2)])
        np.testing.assert_allclose(exported(images).detach().numpy(), expected, atol=1e-5)

    # The head's own predictor runs the extracted network too.
    predictor = load_predictor(cache, "logistic")
    files = [image_folder / p for p in cache.paths("val")]
    images = torch.stack([prepare_image(load_rgb(f), predictor.preprocessing) for f in files])
    np.testing.assert_allclose(predictor.features(images).numpy(), cache.features("val", "pool"), rtol=1e-4, atol=1e-5)
