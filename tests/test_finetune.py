"""The finetune stage: LP-FT start, frozen parts untouched, resume, fast path, new checkpoint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from featurecache import extract, open_cache
from featurecache.errors import HeadError, UsageError
from featurecache.extract.stage import ExtractSpec
from featurecache.finetune.stage import (FinetuneSpec, build_model, finetune, load_finetuned_predictor, parse_unfreeze,
                                         with_default_unfreeze, _rows, _split_rows)
from featurecache.finetune.data import Augmentation, train_epoch
from featurecache.fit.stage import FitSpec, fit_head
from featurecache.fit.headstore import load_head
from featurecache.backbones.preprocess import prepare_image
from featurecache.data.sources import open_source

from helpers import assert_features_of_the_same_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Small, fast and deterministic: resnet18 with random weights, fp32 forward, float32 storage.
TINY = dict(model="resnet18", weights="random", precision="fp32", dtype="float32", batch_size=32,
            workers=0, taps=("pool", "layer3"))


def _spec(**changes) -> FinetuneSpec:
    base = dict(epochs=1, batch_size=8, workers=0, precision="fp32", device="cpu", hflip=False)
    return FinetuneSpec(**{**base, **changes})


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """16 random 40 px photos, 2 classes, at 32 px, with a logistic head."""
    from helpers import write_image

    root = tmp_path_factory.mktemp("tiny")
    seed = 0
    for split, count in (("train", 5), ("val", 3)):
        for label in ("ants", "bees"):
            for i in range(count):
                seed += 1
                write_image(root / "photos" / split / label / f"{label}_{i}.png", seed)
    result = extract(ExtractSpec(source=str(root / "photos"), image_size=32, root=str(root / "cache"), **TINY))
    cache = open_cache(result.path)
    fit_head(cache, FitSpec(head="logistic", name="logistic"))
    return cache


@pytest.fixture(scope="module")
def half_cache(tmp_path_factory):
    """The tiny photos with the default float16 storage, with a logistic head."""
    from helpers import write_image

    root = tmp_path_factory.mktemp("half")
    for seed in range(16):
        write_image(root / "photos" / ("train", "val")[seed % 2] / ("ants", "bees")[seed // 2 % 2] / f"{seed}.png",
                    seed + 1)
    result = extract(ExtractSpec(source=str(root / "photos"), image_size=32, root=str(root / "cache"),
                                 **{**TINY, "dtype": "float16"}))
    cache = open_cache(result.path)
    fit_head(cache, FitSpec(head="logistic", name="logistic"))
    return cache


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """A digits subset (300 train, 150 val) at 16 px, float16 storage (the default), with a deliberately
    weak logistic head (C=1e-4)."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    data = load_digits()
    for index in range(450):
        split = "train" if index < 300 else "val"
        pixels = (data.images[index] * 255 / 16).astype(np.uint8)
        path = root / "digits" / split / str(data.target[index]) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    result = extract(ExtractSpec(source=str(root / "digits"), image_size=16, root=str(root / "cache"),
                                 **{**TINY, "dtype": "float16"}))
    cache = open_cache(result.path)
    fit_head(cache, FitSpec(head="logistic", name="weak", params={"C": 1e-4}))
    return cache


def test_unfreeze_names_trailing_blocks(tiny_cache):
    model, _, _ = build_model(tiny_cache, _spec())
    assert model.trainable == ["layer4.0", "layer4.1"]  # no --unfreeze: a ResNet's last stage
    assert with_default_unfreeze(FinetuneSpec(), "resnet18").unfreeze == "layer4"
    assert with_default_unfreeze(FinetuneSpec(unfreeze="2"), "resnet18").unfreeze == "2"
    assert parse_unfreeze(model.backbone, "layer4") == ["layer4.0", "layer4.1"]
    assert parse_unfreeze(model.backbone, "layer3+") == ["layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    assert parse_unfreeze(model.backbone, "3") == ["layer3.1", "layer4.0", "layer4.1"]
    for bad in ("layer3", "0", "99", "conv1"):
        with pytest.raises(UsageError):
            parse_unfreeze(model.backbone, bad)


def test_frozen_parameters_are_bit_identical_and_unfrozen_ones_change(tiny_cache):
    spec = _spec(unfreeze="3", train_bn=True, lr=1e-2, backbone_lr=1e-2)
    model, head_name, record = build_model(tiny_cache, spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = _rows(tiny_cache, _split_rows(tiny_cache, record), spec, model)
    from featurecache.finetune.stage import _optimizer

    train_epoch(model, rows["train"], optimizer=_optimizer(model, spec), scaler=torch.amp.GradScaler("cpu", enabled=False),
                step=0, total_steps=2, batch_size=4, generator=torch.Generator().manual_seed(0),
                augmentation=Augmentation(), device=torch.device("cpu"), precision="fp32", seed=0,
                progress=None, epoch=1)
    after = model.state_dict()
    trainable = ("backbone.layer3.1.", "backbone.layer4.", "head.")
    for key, value in before.items():
        if key.startswith(trainable):
            if key.endswith(("weight", "bias")) and not key.startswith("head.standardize"):
                assert not torch.equal(value, after[key]), f"{key} did not change"
        else:  # frozen: weights and BatchNorm statistics, bit for bit
            assert torch.equal(value, after[key]), f"{key} changed"
    assert not torch.equal(before["backbone.layer4.0.bn1.running_mean"], after["backbone.layer4.0.bn1.running_mean"])


@pytest.mark.parametrize("from_cache", [False, True])
def test_epoch_zero_is_exactly_the_starting_head(tiny_cache, from_cache):
    # The head's logits module folds in its standardisation, and validation rounds the pooled
    # features to the cache's storage dtype, so before any step the model computes what the
    # head computed on the cached features: the same top-1, not merely a close one.
    result = finetune(tiny_cache, _spec(from_cache=from_cache, name=f"zero-{from_cache}"))
    head_top1 = result.record["starting_head_metrics"]["val"]["top1"]
    assert result.record["history"][0]["val_top1"] == head_top1
    head_loss = load_head(tiny_cache, "logistic")[1]["metrics"]["val"]["log_loss"]
    assert result.record["history"][0]["val_loss"] == pytest.approx(head_loss, rel=1e-5, abs=0)
    assert result.record["history"][0]["epoch"] == 0 and len(result.record["history"]) == 2


# Epoch 0 against the head's own validation log-loss on a float16 cache, measured 2026-12-01:
# image path 2.2e-6 relative (float32 arithmetic; 4.2e-5 when the pooled features are not
# rounded to float16 as the head's were); fast path 2.3e-4, since it starts from the cached
# layer3 activations, themselves rounded to float16 (on a float32 cache both paths are within
# 1e-5: test_epoch_zero_is_exactly_the_starting_head).
EPOCH_ZERO_LOSS = {False: 1e-5, True: 5e-4}


@pytest.mark.parametrize("from_cache", [False, True])
def test_epoch_zero_is_the_starting_head_on_float16_storage(half_cache, from_cache):
    result = finetune(half_cache, _spec(from_cache=from_cache, name=f"half-zero-{from_cache}"))
    _, head_record = load_head(half_cache, "logistic")
    start, head_val = result.record["history"][0], head_record["metrics"]["val"]
    assert start["val_top1"] == head_val["top1"]
    assert start["val_loss"] == pytest.approx(head_val["log_loss"], rel=EPOCH_ZERO_LOSS[from_cache], abs=0)


def test_fast_path_and_image_path_agree_without_augmentation(tiny_cache):
    spec = _spec(augment=False)
    runs = {}
    for from_cache in (False, True):
        model, _, record = build_model(tiny_cache, dataclasses.replace(spec, from_cache=from_cache))
        rows = _rows(tiny_cache, _split_rows(tiny_cache, record), dataclasses.replace(spec, from_cache=from_cache), model)
        x_val = next(iter(rows["val"].batches([list(range(len(rows["val"])))], torch.device("cpu"))))[0]
        model.eval()
        with torch.no_grad():
            logits = model(x_val, from_tap=from_cache)
        from featurecache.finetune.stage import _optimizer

        train_epoch(model, rows["train"], optimizer=_optimizer(model, spec), scaler=torch.amp.GradScaler("cpu", enabled=False),
                    step=0, total_steps=3, batch_size=4, generator=torch.Generator().manual_seed(0),
                    augmentation=None, device=torch.device("cpu"), precision="fp32", seed=0, progress=None, epoch=1)
        runs[from_cache] = (logits, model.trainable_state())
    # float32 cache, fp32 forward: only summation order can differ.
    torch.testing.assert_close(runs[False][0], runs[True][0], rtol=1e-4, atol=1e-4)
    for key, value in runs[False][1].items():
        torch.testing.assert_close(value, runs[True][1][key], rtol=1e-3, atol=1e-4)


def test_fast_path_names_the_missing_tap(tmp_path, image_folder, tiny_spec):
    cache = open_cache(extract(tiny_spec(image_folder)).path)  # tap pool only
    with pytest.raises(HeadError, match="fit-head"):
        finetune(cache, _spec())
    fit_head(cache, FitSpec(head="logistic"))
    with pytest.raises(UsageError, match="--tap pool --tap layer3"):
        finetune(cache, _spec(from_cache=True))


def test_interrupted_run_resumes_from_its_saved_epoch(tiny_cache):
    spec = _spec(epochs=2, from_cache=True, lr=1e-2, backbone_lr=1e-3)
    reference = finetune(tiny_cache, dataclasses.replace(spec, name="straight"))

    def interrupt(event):
        if event["phase"] == "train" and event["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_cache, dataclasses.replace(spec, name="broken"), progress=interrupt)
    resumed = finetune(tiny_cache, dataclasses.replace(spec, name="broken"))
    assert resumed.resumed_from == 1 and resumed.record["complete"]
    assert [h["val_top1"] for h in resumed.record["history"]] == [h["val_top1"] for h in reference.record["history"]]
    for a, b in ((reference.path, resumed.path),):
        torch.testing.assert_close(load_file(str(a / "checkpoint.safetensors")), load_file(str(b / "checkpoint.safetensors")))
    with pytest.raises(UsageError, match="--restart"):
        finetune(tiny_cache, dataclasses.replace(spec, name="broken", lr=0.5))


def test_finetuning_raises_accuracy_and_its_checkpoint_makes_a_new_cache(digits_cache):
    result = finetune(digits_cache, _spec(head="weak", unfreeze="1", epochs=2, from_cache=True, batch_size=32,
                                          lr=3e-3, backbone_lr=3e-4))
    history = [h["val_top1"] for h in result.record["history"]]
    assert result.best["val_top1"] > history[0] and result.record["best_epoch"] > 0, history

    # The fine-tuned backbone is a checkpoint like any other: a new entry, with its features.
    weights = result.path / "backbone.safetensors"
    source = digits_cache.manifest["spec"]["source"]
    new = extract(ExtractSpec(source=source, root=str(digits_cache.path.parent),
                              **{**TINY, "dtype": "float16", "taps": ("pool",), "weights": str(weights)}))
    assert new.key != digits_cache.key and new.path != digits_cache.path
    new_cache = open_cache(new.path)
    assert new_cache.manifest["config"]["preprocessing"] == digits_cache.manifest["config"]["preprocessing"]
    predictor = load_finetuned_predictor(digits_cache, result.name)
    images = open_source(source)
    by_path = {s.path: s for s in images.samples}
    batch = torch.stack([prepare_image(images.load(by_path[p]), predictor.preprocessing)
                         for p in new_cache.paths("val")])
    assert_features_of_the_same_images(predictor.features(batch).numpy(), new_cache.features("val"))
    # The predictor is the fine-tuned head on those features, and reproduces the best epoch's accuracy.
    with torch.no_grad():
        probabilities = predictor.head(torch.from_numpy(new_cache.features("val").astype(np.float32))).numpy()
    # Features one float16 step apart (checked above) move the fine-tuned head's probabilities a
    # little: measured 3.4e-5, and 1.2e-4 since the logistic sweep stops at sweep_tol (the
    # starting head, and so the fine-tuned one, changed).
    np.testing.assert_allclose(predictor.predict_proba(batch), probabilities, atol=3e-4)
    top1 = float((probabilities.argmax(1) == new_cache.labels("val")).mean())
    assert top1 == pytest.approx(result.best["val_top1"], abs=2 / len(probabilities))


def test_a_last_batch_of_one_row_joins_the_previous_batch():
    from featurecache.finetune.data import epoch_order

    assert epoch_order(9, 8, None) == [list(range(9))]
    assert [len(b) for b in epoch_order(17, 8, None)] == [8, 9]
    assert sorted(sum(epoch_order(33, 8, torch.Generator().manual_seed(0)), [])) == list(range(33))
