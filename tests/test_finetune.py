"""The finetune stage: LP-FT start, frozen parts untouched, resume, fast path, new checkpoint."""

from __future__ import annotations

import dataclasses
import json

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


def _interrupted(cache, spec: FinetuneSpec, epoch: int) -> None:
    """Run `spec` and stop it (as Ctrl-C does) in the first training batch of `epoch`."""
    def interrupt(event):
        if event["phase"] == "train" and event["epoch"] == epoch:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(cache, spec, progress=interrupt)


def test_interrupted_run_resumes_from_its_saved_epoch(tiny_cache):
    spec = _spec(epochs=2, from_cache=True, lr=1e-2, backbone_lr=1e-3)
    reference = finetune(tiny_cache, dataclasses.replace(spec, name="straight"))
    _interrupted(tiny_cache, dataclasses.replace(spec, name="broken"), 2)
    # --from-cache uses no augmentation, so its settings cannot stop the resume.
    resumed = finetune(tiny_cache, dataclasses.replace(spec, name="broken", augment=False, hflip=True,
                                                       crop_scale=(0.5, 1.0)))
    assert resumed.resumed_from == 1 and resumed.record["complete"]
    assert [h["val_top1"] for h in resumed.record["history"]] == [h["val_top1"] for h in reference.record["history"]]
    for a, b in ((reference.path, resumed.path),):
        torch.testing.assert_close(load_file(str(a / "checkpoint.safetensors")), load_file(str(b / "checkpoint.safetensors")))
    with pytest.raises(UsageError, match="--restart"):
        finetune(tiny_cache, dataclasses.replace(spec, name="broken", lr=0.5))


def test_a_resume_with_other_settings_names_each_one(tmp_path, image_folder, tiny_spec):
    cache = open_cache(extract(tiny_spec(image_folder, taps=("pool", "layer3"))).path)
    for head, kind in (("first", "logistic"), ("second", "mlp")):
        fit_head(cache, FitSpec(head=kind, name=head))
    spec = _spec(head="first", name="run", epochs=2, augment=False)
    _interrupted(cache, spec, 2)
    refusals = {  # other blocks or another head gave "the checkpoint is unreadable or damaged"
        "--unfreeze layer4 (now --unfreeze 1)": dict(unfreeze="1"),
        "--head first (now --head second)": dict(head="second"),
        "--epochs 2 (now --epochs 3) and --lr 0.0003 (now --lr 0.01)": dict(epochs=3, lr=1e-2),
        "--no-augment (now --augment)": dict(augment=True),
        "no --from-cache (now --from-cache)": dict(from_cache=True, hflip=True),  # the path, not its augmentation
    }
    for said, changes in refusals.items():
        with pytest.raises(UsageError) as refused:
            finetune(cache, dataclasses.replace(spec, **changes))
        assert str(refused.value) == (f"finetune run 'run' was started with {said}; pass the same values to resume "
                                      "it, --restart to start over, or --name NEW to keep it and start another")
    # The default folder named with --name, and the default head named with --head, are the same run.
    _interrupted(cache, dataclasses.replace(spec, name=None, head=None), 2)
    assert finetune(cache, dataclasses.replace(spec, name="first-layer4")).resumed_from == 1
    # A starting head fitted again may carve other validation rows: not the run that was started.
    fit_head(cache, FitSpec(head="logistic", name="first", params={"C": 0.01}, overwrite=True))
    with pytest.raises(UsageError, match=r"started with another fit of head first \(it was fitted again since\)"):
        finetune(cache, spec)
    assert finetune(cache, dataclasses.replace(spec, restart=True)).record["complete"]


def test_a_checkpoint_that_does_not_record_its_head_fit_is_not_resumed(tiny_cache):
    from featurecache.cache.integrity import write_safetensors
    from featurecache.finetune.runs import STATE_METADATA, read_checkpoint

    spec = _spec(name="older", epochs=2, from_cache=True)
    _interrupted(tiny_cache, spec, 2)
    path = tiny_cache.path / "finetune" / "older" / "checkpoint.safetensors"
    tensors, state = read_checkpoint(path)  # as an older featurecache wrote it: no fit of the head, head unresolved
    state["settings"] = {k: v for k, v in state["settings"].items() if k != "starting_head_checksum"} | {"head": None}
    write_safetensors(path, tensors, {STATE_METADATA: json.dumps(state)})
    with pytest.raises(UsageError) as refused:
        finetune(tiny_cache, spec)
    assert str(refused.value) == ("finetune run 'older' was started by an older featurecache, whose checkpoint does "
                                  "not record which fit of its starting head it began from; pass --restart to start "
                                  "over, or --name NEW to keep it and start another")


def test_an_unfinished_run_is_refused_by_export_and_used_by_predict_with_a_warning(tiny_cache, tmp_path):
    import csv
    import shlex

    from typer.testing import CliRunner

    from featurecache.cli import app
    from featurecache.errors import CacheIncompleteError
    from featurecache.finetune.runs import load_finetune_run, read_finetune_record
    from helpers import stderr_lines

    spec = _spec(epochs=2, from_cache=True, lr=1e-2, backbone_lr=1e-3)
    reference = finetune(tiny_cache, dataclasses.replace(spec, name="finished"))
    _interrupted(tiny_cache, dataclasses.replace(spec, name="unfinished"), 2)
    command = (f"featurecache finetune {tiny_cache.path} --name unfinished --unfreeze layer4 --epochs 2 --lr 0.01 "
               "--backbone-lr 0.001 --batch-size 8 --from-cache --precision fp32")
    warning = f"finetune run 'unfinished' is unfinished (1 of 2 epochs); rerun the finetune command to finish it: {command}"
    with pytest.raises(CacheIncompleteError) as refused:
        load_finetuned_predictor(tiny_cache, "unfinished")
    assert str(refused.value) == warning
    runner, model = CliRunner(), tmp_path / "model.pt"
    exported = runner.invoke(app, ["export", str(tiny_cache.path), "--finetune", "unfinished", "-o", str(model)])
    assert (exported.exit_code, stderr_lines(exported), model.exists()) == (1, [f"error: {warning}"], False)

    image, table = f"{tiny_cache.manifest['spec']['source']}/val/ants/ants_0.png", tmp_path / "p.csv"
    predicted = runner.invoke(app, ["predict", str(tiny_cache.path), image, "--finetune", "unfinished", "-o", str(table)])
    assert (predicted.exit_code, stderr_lines(predicted)) == (1, [f"warning: {warning}"])
    row = next(csv.DictReader(table.open()))
    predictor, said = load_finetune_run(tiny_cache, "unfinished", unfinished_ok=True)
    assert said == warning and row["class1"] in predictor.classes and float(row["prob1"]) > 0

    # The command the warning gives finishes the run, as if it had never stopped.
    resumed = runner.invoke(app, shlex.split(command)[1:] + ["--quiet"])
    assert resumed.exit_code == 0 and "resumed after epoch 1" in resumed.stdout, resumed.output
    record = read_finetune_record(tiny_cache, "unfinished")
    assert record["complete"] and record["history"][1:] == [
        {**h, "seconds": r["seconds"]} for h, r in zip(reference.record["history"][1:], record["history"][1:])]
    exported = runner.invoke(app, ["export", str(tiny_cache.path), "--finetune", "unfinished", "-o", str(model)])
    assert exported.exit_code == 0 and model.exists()
    predicted = runner.invoke(app, ["predict", str(tiny_cache.path), image, "--finetune", "unfinished"])
    assert predicted.exit_code == 0 and not predicted.stderr


def test_a_missing_run_lists_the_runs_and_a_folder_without_a_record_is_unfinished(tiny_cache):
    from featurecache.errors import CacheIncompleteError
    from featurecache.finetune.runs import load_finetune_run

    finetune(tiny_cache, _spec(name="listed", from_cache=True))
    with pytest.raises(HeadError) as missing:
        load_finetuned_predictor(tiny_cache, "nope")
    runs = sorted(p.parent.name for p in (tiny_cache.path / "finetune").glob("*/finetune.json"))
    assert "listed" in runs and f"(runs: {', '.join(runs)});" in str(missing.value)  # it listed head.safetensors
    (tiny_cache.path / "finetune" / "early").mkdir()  # stopped before its first record
    with pytest.raises(CacheIncompleteError, match="'early' has no record yet.*rerun the finetune command"):
        load_finetune_run(tiny_cache, "early", unfinished_ok=True)
    (tiny_cache.path / "finetune" / "early").rmdir()


def test_a_restarted_run_is_unfinished_until_its_record_is_its_own(tiny_cache, monkeypatch):
    import importlib

    from featurecache.errors import CacheIncompleteError
    from featurecache.finetune.runs import load_finetune_run, read_finetune_record

    spec = _spec(name="again", from_cache=True)
    finetune(tiny_cache, spec)
    # Stopped in its first epoch: the outputs are its epoch 0, and so is the record.
    _interrupted(tiny_cache, dataclasses.replace(spec, lr=1e-2, restart=True), 1)
    record = read_finetune_record(tiny_cache, "again")
    assert (record["complete"], record["spec"]["lr"], len(record["history"])) == (False, 1e-2, 1)
    assert load_finetune_run(tiny_cache, "again", unfinished_ok=True)[1].startswith(
        "finetune run 'again' is unfinished (0 of 1 epochs)")
    # Stopped before its first record: the old complete record and checkpoint must not describe the
    # new outputs (another head's, say), nor be resumed over them.
    assert finetune(tiny_cache, spec).record["complete"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("featurecache.finetune.stage"), "save_outputs", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_cache, dataclasses.replace(spec, restart=True))
    with pytest.raises(CacheIncompleteError, match="'again' has no record yet"):
        load_finetune_run(tiny_cache, "again", unfinished_ok=True)
    assert not (tiny_cache.path / "finetune" / "again" / "checkpoint.safetensors").exists()


def test_weights_of_another_epoch_than_the_record_are_refused(tiny_cache):
    from featurecache.cache.integrity import seal_json
    from featurecache.errors import CacheIncompleteError, CorruptCacheError
    from featurecache.finetune.runs import load_finetune_run

    result = finetune(tiny_cache, _spec(name="mismatch", from_cache=True))
    path, best = result.path / "finetune.json", result.record["best_epoch"]

    def rewrite(**changes):
        record = {k: v for k, v in json.loads(path.read_text()).items() if k != "checksum"}
        path.write_text(json.dumps(seal_json({**record, **changes})))

    rewrite(best_epoch=1 - best)
    with pytest.raises(CorruptCacheError, match=f"holds a backbone of epoch {best}, head of epoch {best}, but its "
                                                f"record's best epoch is {1 - best}; run it again with --restart"):
        load_finetuned_predictor(tiny_cache, "mismatch")
    rewrite(complete=False)  # stopped (or running) between writing the weights and the record
    with pytest.raises(CacheIncompleteError, match="'mismatch' is being written.*rerun the finetune command"):
        load_finetune_run(tiny_cache, "mismatch", unfinished_ok=True)


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
