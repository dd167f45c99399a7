"""fit-head, heads, ensemble, predict and export on a small real cache."""

from __future__ import annotations

import json
import re
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from featurecache import ExtractSpec, extract, open_cache
from featurecache.cli import app
from featurecache.errors import CorruptCacheError, MismatchError
from featurecache.serve.export import METADATA_FILE, export_model
from featurecache.fit.stage import FitSpec, fit_head, leaderboard, make_ensemble
from featurecache.fit.headstore import load_head, read_record_with_checksum
from featurecache.data.images import load_rgb
from featurecache.cache.integrity import seal_json
from featurecache.serve.predict import load_predictor, predict, predict_split
from featurecache.backbones.preprocess import prepare_image
from featurecache.cache.shards import CHECKSUM_ATTR, features_checksum, features_layout, file_sha256

from helpers import assert_features_of_the_same_images, replace_spec, stderr_lines

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 220)}


def _colour_folder(root, counts=(("train", 8), ("val", 4), ("test", 4))):
    """Three classes told apart by colour, with noise, so heads have something to learn."""
    rng = np.random.default_rng(0)
    for split, count in counts:
        for label, colour in COLOURS.items():
            for i in range(count):
                pixels = np.clip(rng.normal(colour, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                (root / split / label).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def _colour_template(tmp_path_factory):
    base = tmp_path_factory.mktemp("template")
    folder = _colour_folder(base / "colours")
    spec = ExtractSpec(source=str(folder), model="resnet18", weights="random", image_size=32, precision="fp32",
                       dtype="float16", batch_size=16, workers=0, shard_size=64, root=str(base / "cache"))
    return extract(spec).path, folder


@pytest.fixture
def colour_cache(_colour_template, tmp_path):
    """A fresh copy of one extracted cache per test (extracting once saves minutes)."""
    path, folder = _colour_template
    shutil.copytree(path.parent, tmp_path / "cache", dirs_exist_ok=True)
    return open_cache(tmp_path / "cache" / path.name), folder


@pytest.mark.parametrize("head", ["logistic", "mlp", "knn", "sklearn:svm.LinearSVC"])
def test_fit_head_writes_weights_and_record(colour_cache, head):
    cache, _ = colour_cache
    params = {"epochs": 30, "lr": 3e-3, "weight_decay": 1e-4} if head == "mlp" else {}
    result = fit_head(cache, FitSpec(head=head, params=params))
    assert (result.path / "head.safetensors").exists()
    record = json.loads((result.path / "head.json").read_text())
    assert record["cache_key"] == cache.key and record["tap"] == "pool"
    assert set(record["metrics"]) == {"val", "test"}
    test = record["metrics"]["test"]
    assert {"top1", "per_class_accuracy", "confusion_matrix"} <= set(test)
    assert np.asarray(test["confusion_matrix"]).sum() == 12
    assert record["headline"]["split"] == "test" and record["fit_seconds"] >= 0
    assert test["top1"] > 0.6  # well above chance (1/3) on colour classes
    loaded, _ = load_head(cache, result.name)
    X = cache.features("test")
    np.testing.assert_allclose(loaded.predict_proba(X), result.head.predict_proba(X), atol=1e-6)


def test_logistic_sweep_is_chosen_on_validation(colour_cache):
    cache, _ = colour_cache
    record = fit_head(cache, FitSpec(head="logistic")).record
    assert "C" in record["chosen"] and record["selection_split"] == "val"
    assert len(record["config"]["sweep_"]) >= 10


def test_without_test_split_the_headline_is_labelled(tmp_path, tiny_spec):
    folder = _colour_folder(tmp_path / "c2", counts=(("train", 8), ("val", 4)))
    cache = open_cache(extract(tiny_spec(folder)).path)
    record = fit_head(cache, FitSpec(head="knn")).record
    assert record["headline"]["split"] == "val" and "same split" in record["headline"]["note"]
    carved = fit_head(cache, FitSpec(head="knn", name="carved", val_fraction=0.25)).record
    assert carved["selection_split"] == "val (from train)" and carved["rows"]["train"] == 18


def test_ensemble_of_one_head_equals_the_head(colour_cache):
    cache, _ = colour_cache
    fit_head(cache, FitSpec(head="logistic"))
    single = make_ensemble(cache, ["logistic"], name="solo")
    X = cache.features("val")
    np.testing.assert_array_equal(single.head.predict_proba(X), load_head(cache, "logistic")[0].predict_proba(X))
    fit_head(cache, FitSpec(head="knn"))
    vote = make_ensemble(cache, ["logistic", "knn"], name="vote", weights=[3, 1])
    assert vote.record["members"] == ["logistic", "knn"]
    names = [row["name"] for row in leaderboard(cache)]
    assert set(names) == {"logistic", "knn", "solo", "vote"}


def test_predict_matches_the_head_on_cached_features(colour_cache):
    cache, folder = colour_cache
    fit_head(cache, FitSpec(head="logistic"))
    paths = cache.paths("test")
    results = predict(load_predictor(cache, "logistic"), [folder / p for p in paths], top_k=3)
    head, _ = load_head(cache, "logistic")
    cached = head.predict_proba(cache.features("test"))
    assert [r.top[0][0] for r in results] == [cache.classes[i] for i in cached.argmax(axis=1)]
    np.testing.assert_allclose([r.top[0][1] for r in results], cached.max(axis=1), atol=2e-3)


class NaNForSecondImage(torch.nn.Module):
    """A head whose probabilities for the second image of a batch are NaN, and for the fourth
    twice what they should be (a sum of 2: two classes at 1.000 were shown as confident)."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        probabilities = self.head(features).clone()
        probabilities[1] = float("nan")
        if len(probabilities) > 3:
            probabilities[3] *= 2
        return probabilities


def test_predict_reports_an_image_it_cannot_score_and_an_unreadable_one(colour_cache, tmp_path):
    """NaN probabilities are an error for that image, not a class (argsort would rank NaN
    first): the other images keep their predictions, and the error says which case it is."""
    cache, folder = colour_cache
    fit_head(cache, FitSpec(head="logistic"))
    predictor = load_predictor(cache, "logistic")
    files = [folder / p for p in cache.paths("test")[:3]]
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    expected = predict(predictor, files, top_k=2)
    predictor.head = NaNForSecondImage(predictor.head)
    results = predict(predictor, [files[0], tmp_path / "broken.jpg", files[1], files[2], files[1]], top_k=2)
    assert results[1].top == [] and results[1].error.startswith("unreadable: ")
    assert results[2].top == [] and results[2].error == "no prediction: the model gave NaN or inf for this image"
    assert [r.top for r in (results[0], results[3])] == [expected[0].top, expected[2].top]
    assert not results[0].error and not results[3].error
    assert results[4].top == [] and results[4].error.startswith(
        "no prediction: the model's probabilities are not a distribution (they sum to 2,")


def _test_images(cache, folder, preprocessing) -> torch.Tensor:
    return torch.stack([prepare_image(load_rgb(folder / p), preprocessing) for p in cache.paths("test")])


def test_predict_computes_the_cached_features_of_the_same_files(colour_cache):
    cache, folder = colour_cache
    fit_head(cache, FitSpec(head="logistic"))
    predictor = load_predictor(cache, "logistic")
    cached = cache.features("test")
    assert_features_of_the_same_images(predictor.features(_test_images(cache, folder, predictor.preprocessing)).numpy(),
                                        cached)
    results = predict(predictor, [folder / p for p in cache.paths("test")], top_k=3)
    head, _ = load_head(cache, "logistic")
    expected = head.predict_proba(cached)
    got = np.array([[dict(r.top)[name] for name in cache.classes] for r in results])
    np.testing.assert_allclose(got, expected, atol=1e-6)  # measured 2e-8


def test_exported_model_computes_the_cached_features(colour_cache, tmp_path):
    cache, folder = colour_cache
    fit_head(cache, FitSpec(head="logistic"))
    predictor = load_predictor(cache, "logistic")
    model = torch.jit.load(str(export_model(predictor, tmp_path / "model.pt")))
    images = _test_images(cache, folder, predictor.preprocessing)
    normalize, classifier = getattr(model, "0"), getattr(model, "1")
    with torch.no_grad():
        features = classifier.features(normalize(images)).flatten(1)
        rounded = features.half().float()
        assert_features_of_the_same_images(rounded.numpy(), cache.features("test"))
        # The exported head sees float16-rounded features, as the head did when it was fitted.
        np.testing.assert_allclose(model(images).numpy(), predictor.head(rounded).numpy(), rtol=0, atol=1e-8)


def test_export_reproduces_predict(colour_cache, tmp_path):
    cache, folder = colour_cache
    fit_head(cache, FitSpec(head="logistic"))
    predictor = load_predictor(cache, "logistic")
    path = export_model(predictor, tmp_path / "model.pt")
    extra = {METADATA_FILE: ""}
    model = torch.jit.load(str(path), _extra_files=extra)  # plain PyTorch, no featurecache needed
    meta = json.loads(extra[METADATA_FILE])
    assert meta["classes"] == cache.classes and meta["preprocessing"]["crop_size"] == 32
    files = sorted((folder / "test").rglob("*.png"))
    images = torch.stack([prepare_image(load_rgb(f), predictor.preprocessing) for f in files])
    expected = np.array([[p for _, p in sorted(r.top, key=lambda t: cache.classes.index(t[0]))]
                         for r in predict(predictor, files, top_k=3)])
    np.testing.assert_allclose(model(images).detach().numpy(), expected, atol=1e-5)


def test_head_refuses_another_caches_features(colour_cache, tiny_spec):
    cache, folder = colour_cache
    fit_head(cache, FitSpec(head="knn"))
    other = open_cache(extract(replace_spec(tiny_spec(folder), seed=7, dtype="float16", shard_size=64)).path)
    shutil.copytree(cache.path / "heads", other.path / "heads")
    with pytest.raises(MismatchError, match="other features"):
        load_head(other, "knn")
    assert leaderboard(other)[0]["stale"]


def test_a_head_without_a_torch_module_predicts_images_as_it_predicts_cached_features(colour_cache, tmp_path):
    """GaussianNB is no softmax of a linear map (no module, so no export), but predict on
    images was refused too: it now runs the head's predict_proba on the images' features."""
    cache, folder = colour_cache
    fit_head(cache, FitSpec(head="sklearn:naive_bayes.GaussianNB", name="nb"))
    on_images = predict(load_predictor(cache, "nb"), [folder / "test"], top_k=len(cache.classes))
    on_features = {r.path: dict(r.top) for r in predict_split(cache, "nb", "test", top_k=len(cache.classes))}
    assert len(on_images) == len(on_features) > 0
    for result in on_images:
        match = next(p for p in on_features if result.path.endswith(p) or p.endswith(result.path))
        expected = on_features[match]
        assert set(dict(result.top)) == set(expected)
        assert all(abs(p - expected[c]) < 1e-4 for c, p in result.top), (result.top, expected)
    refused = runner.invoke(app, ["export", str(cache.path), "--head", "nb", "-o", str(tmp_path / "nb.pt")])
    assert refused.exit_code == 2 and "not a softmax of a linear map" in refused.stderr
    assert not (tmp_path / "nb.pt").exists()


def test_a_head_refuses_a_cache_whose_class_names_changed(colour_cache):
    """A class list edited in the manifest and sealed again (verify --repair seals what it
    finds) kept its count: the heads predicted with swapped names at their old accuracy."""
    cache, _ = colour_cache
    fit_head(cache, FitSpec(head="logistic"))
    manifest = json.loads((cache.path / "manifest.json").read_text())
    classes = manifest["classes"]
    classes[0], classes[1] = classes[1], classes[0]
    (cache.path / "manifest.json").write_text(json.dumps(seal_json(manifest)))
    edited = open_cache(cache.path)
    with pytest.raises(MismatchError, match=f"class 0 is '{classes[1]}' in the head, '{classes[0]}' in the cache"):
        load_head(edited, "logistic")
    assert leaderboard(edited)[0]["stale"]
    result = runner.invoke(app, ["predict", str(cache.path), "--split", "test", "--head", "logistic"])
    assert result.exit_code == 2 and "named wrongly" in result.stderr


def test_nan_features_are_refused_at_fit_time(colour_cache):
    cache, _ = colour_cache
    shard = cache.path / cache.manifest["shards"][0]["file"]
    with h5py.File(shard, "r+") as handle:  # NaN written by the backbone itself: checksums agree with it
        dataset = handle["features/pool"]
        dataset[0, 0] = np.nan
        dataset.attrs[CHECKSUM_ATTR] = features_checksum(dataset[:])
    manifest = json.loads((cache.path / "manifest.json").read_text())
    record = manifest["shards"][0]
    record.update(features=features_layout(shard), sha256=file_sha256(shard), bytes=shard.stat().st_size)
    (cache.path / "manifest.json").write_text(json.dumps(seal_json(manifest)))
    with pytest.raises(CorruptCacheError, match="NaN"):
        fit_head(open_cache(cache.path), FitSpec(head="knn"))


def test_cli_fit_heads_ensemble_predict_export(colour_cache, tmp_path):
    cache, folder = colour_cache
    path = str(cache.path)
    assert runner.invoke(app, ["fit-head", path, "--head", "logistic"]).exit_code == 0
    result = runner.invoke(app, ["fit-head", path, "--head", "knn", "--param", "k=[1,3]", "--name", "nn"])
    assert result.exit_code == 0 and "head nn: test top-1" in result.stdout
    assert runner.invoke(app, ["ensemble", path, "logistic", "nn", "--name", "vote"]).exit_code == 0
    board = runner.invoke(app, ["heads", path])
    assert all(name in board.stdout for name in ("logistic", "nn", "vote"))
    out = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", path, str(folder / "test"), "--head", "vote", "-o", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0].startswith("path,class1,prob1") and len(lines) == 13
    result = runner.invoke(app, ["export", path, "--head", "vote", "-o", str(tmp_path / "m.pt")])
    assert result.exit_code == 0 and (tmp_path / "m.pt").exists()
    extra = {METADATA_FILE: ""}  # provenance: the entry, its key and which fit of the head, not what was typed
    torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    meta = json.loads(extra[METADATA_FILE])
    assert (meta["cache"], meta["cache_key"], meta["head"]) == (cache.path.name, cache.key, "vote")
    assert meta["head_checksum"] == read_record_with_checksum(cache, "vote")[1]
    # the files are readable by others as any new file is (safetensors writes 0600)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (cache.path / "heads" / "vote").iterdir()}
    modes["m.pt"] = (tmp_path / "m.pt").stat().st_mode & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_predict_and_export_refuse_an_output_path_they_would_break(colour_cache, tmp_path, monkeypatch):
    """-o is checked before any work: an existing file is replaced only with --overwrite (a typo
    replaced an image), and a path under a file, '-' (it wrote a file named '-') and a path in a
    cache entry or its root's weights folder are refused even with --overwrite
    (`export -o ENTRY/manifest.json --overwrite` destroyed the entry)."""
    cache, folder = colour_cache
    path = str(cache.path)
    assert runner.invoke(app, ["fit-head", path, "--head", "logistic"]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    image = next((folder / "test").rglob("*.png"))
    image_bytes = image.read_bytes()
    weights = next((cache.path.parent / "_weights").iterdir())

    def cache_files() -> dict:
        return {p: p.read_bytes() for p in sorted(cache.path.parent.rglob("*")) if p.is_file()}

    before = cache_files()
    for command, example in ((["predict", path, str(image), "--head", "logistic"], "predictions.csv"),
                             (["export", path, "--head", "logistic"], "model.pt")):
        refusals = [([str(image)], f"-o {image} exists; pass --overwrite to replace it, or choose another name"),
                    ([str(image / "out.csv")], f"-o {image / 'out.csv'}: {image} is a file, not a folder; choose "
                                               "another path"),
                    (["-"], "-o - would write a file named '-': this command does not write to standard output; "
                            f"give a name such as {example}"),
                    ([str(weights), "--overwrite"], f"{weights} lies inside the cache's weights folder "
                                                    f"{weights.parent}, which every entry of the cache loads; choose "
                                                    "a path outside it")]
        refusals += [([str(target), "--overwrite"], f"{target} lies inside the cache entry {cache.path}, whose files "
                                                    "featurecache manages; choose a path outside it")
                     for target in (cache.path / "manifest.json", cache.path / "heads" / "logistic" / "head.json",
                                    cache.path / "new" / "model.pt")]
        for arguments, expected in refusals:
            result = runner.invoke(app, [*command, "-o", *arguments])
            assert result.exit_code == 2, result.output
            assert stderr_lines(result) == [f"error: {expected}"]
    assert image.read_bytes() == image_bytes and not (tmp_path / "-").exists()
    assert cache_files() == before and not (cache.path / "new").exists()
    target = tmp_path / "old.csv"
    target.write_text("old")
    result = runner.invoke(app, ["predict", path, str(image), "--head", "logistic", "-o", str(target), "--overwrite",
                                 "--top-k", "50"])
    assert result.exit_code == 0, result.output
    header = target.read_text().splitlines()[0].split(",")
    assert header[-3:] == [f"class{len(cache.classes)}", f"prob{len(cache.classes)}", "error"]  # not 50 columns


def test_cli_predict_exits_1_when_an_image_has_no_prediction(colour_cache, tmp_path):
    """The table and the CSV keep every row, but a script must not take a run with missing
    predictions for a complete one: a warning counts them and the exit code is 1."""
    cache, folder = colour_cache
    path = str(cache.path)
    assert runner.invoke(app, ["fit-head", path, "--head", "logistic"]).exit_code == 0
    good = sorted((folder / "test").rglob("*.png"))[:2]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    result = runner.invoke(app, ["predict", path, *map(str, good), "--head", "logistic"])
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output
    out = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", path, str(good[0]), str(broken), str(good[1]), "--head", "logistic",
                                 "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == "warning: 1 of 3 have no prediction (their error column says why)"
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == 3 and rows[1].split(",")[-1].startswith("unreadable: ")
    assert [row.split(",")[-1] for row in (rows[0], rows[2])] == ["", ""]
    result = runner.invoke(app, ["predict", path, str(broken), "--head", "logistic", "-o", str(out), "--overwrite"])
    assert result.exit_code == 1 and out.read_text().splitlines()[0] == "path,class1,prob1,class2,prob2,class3,prob3,error"
    result = runner.invoke(app, ["predict", path, str(broken), "--head", "logistic"])
    assert result.exit_code == 1 and "unreadable: " in result.stdout
    assert result.stderr.strip() == "warning: 1 of 1 have no prediction (the table says why)"


@pytest.mark.parametrize("arguments, fragment", [
    (["fit-head", "{cache}", "--head", "bogus"], "unknown head"),
    (["fit-head", "/no/such/cache"], "no cache entry"),
    (["fit-head", "{cache}", "--tap", "layer3"], "tap 'layer3' is not in .*pass --tap pool, or extract again with --tap layer3"),
    (["predict", "{cache}", "/no/such.jpg", "--head", "logistic"], "no head"),
    (["ensemble", "{cache}", "missing-head"], "no head"),
    (["fit-head", "{cache}", "--param", "nonsense"], "key=value"),
])
def test_fit_bad_input(colour_cache, arguments, fragment):
    cache, _ = colour_cache
    result = runner.invoke(app, [a.format(cache=cache.path) for a in arguments])
    assert result.exit_code == 2, result.output
    assert re.search(fragment, result.stderr) and result.stderr.startswith("error: ")


def test_empty_train_split_is_refused(tmp_path, tiny_spec):
    folder = _colour_folder(tmp_path / "only-test", counts=(("test", 2),))
    cache = open_cache(extract(tiny_spec(folder)).path)
    result = runner.invoke(app, ["fit-head", str(cache.path)])
    assert result.exit_code == 2 and "no training rows" in result.stderr
