"""Unlabeled splits: cached, never fitted or scored, and predicted straight from the cache."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from featurecache import FitSpec, extract, fit_head, make_ensemble, open_cache
from featurecache.cli import app
from featurecache.errors import SourceError
from featurecache.finetune.stage import FinetuneSpec, finetune
from featurecache.serve.predict import load_predictor, predict, predict_split
from featurecache.report.page import ReportSpec, build_report
from featurecache.data.sources import open_source

import replicas

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


def _kaggle_folder(root):
    """train/<class>/ and val/<class>/ labelled, test/ a flat folder of unlabelled images."""
    seed = 0
    for split, count in (("train", 6), ("val", 3)):
        for label, name in enumerate(("red", "green", "blue")):
            for i in range(count):
                replicas.class_image(root / split / name / f"{i}.png", label, seed := seed + 1, size=32)
    for i in range(5):
        replicas.class_image(root / "test" / f"unknown_{i}.png", i % 3, seed := seed + 1, size=32)
    return root


@pytest.fixture
def unlabeled_cache(tmp_path, tiny_spec):
    folder = _kaggle_folder(tmp_path / "kaggle")
    result = extract(tiny_spec(folder, unlabeled=("test",)))
    return open_cache(result.path), folder


def test_image_folder_with_unlabeled_split_is_cached(unlabeled_cache):
    cache, _ = unlabeled_cache
    assert cache.splits == {"train": 18, "val": 9, "test": 5}
    assert cache.unlabeled_splits == ["test"] and cache.labeled_splits == {"train": 18, "val": 9}
    assert cache.manifest["unlabeled_splits"] == ["test"]
    assert (cache.labels("test") == -1).all() and cache.classes == ["blue", "green", "red"]
    assert cache.paths("test") == [f"test/unknown_{i}.png" for i in range(5)]


def test_fit_ensemble_and_report_never_score_the_unlabeled_split(unlabeled_cache):
    cache, _ = unlabeled_cache
    logistic = fit_head(cache, FitSpec(head="logistic")).record
    assert set(logistic["metrics"]) == {"val"} and "test" not in logistic["rows"]
    assert logistic["headline"]["split"] == "val"
    knn = fit_head(cache, FitSpec(head="knn")).record
    assert set(knn["metrics"]) == {"val"}
    assert set(make_ensemble(cache, ["logistic", "knn"], name="vote").record["metrics"]) == {"val"}
    page = build_report(cache, ReportSpec(worst=2)).path.read_text()
    assert "test 5 images" in page and "--split test" in page


def test_streamed_heads_skip_the_unlabeled_split(unlabeled_cache):
    cache, _ = unlabeled_cache
    for head in ("logistic", "knn"):
        record = fit_head(cache, FitSpec(head=head, name=f"s-{head}", max_memory=1024)).record
        assert record["streamed"] and set(record["metrics"]) == {"val"} and "test" not in record["rows"]
        assert len(predict_split(cache, f"s-{head}", "test")) == 5


def test_predict_split_from_the_cache_matches_predicting_the_images(unlabeled_cache, tmp_path):
    cache, folder = unlabeled_cache
    fit_head(cache, FitSpec(head="logistic"))
    from_cache = predict_split(cache, "logistic", "test", top_k=2)
    from_images = predict(load_predictor(cache, "logistic"), [folder / "test"], top_k=2)
    assert [p.path for p in from_cache] == cache.paths("test")
    assert [p.top[0][0] for p in from_cache] == [p.top[0][0] for p in from_images]
    for a, b in zip(from_cache, from_images):
        assert np.allclose([x[1] for x in a.top], [x[1] for x in b.top], atol=1e-3)
    # the colours were drawn as red, green, blue, red, green: a sane head finds them
    assert [p.top[0][0] for p in from_cache] == ["red", "green", "blue", "red", "green"]

    output = tmp_path / "test.csv"
    result = runner.invoke(app, ["predict", str(cache.path), "--split", "test", "--head", "logistic", "-o", str(output)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(output.open()))
    assert [r["path"] for r in rows] == cache.paths("test") and rows[0]["class1"] == "red"
    table = runner.invoke(app, ["predict", str(cache.path), "--split", "test", "--head", "logistic"])
    assert table.exit_code == 0 and "unknown_4.png" in table.output


def test_predict_split_errors_are_one_line(unlabeled_cache):
    cache, folder = unlabeled_cache
    fit_head(cache, FitSpec(head="logistic"))
    for arguments, fragment in ((["--split", "nope", "--head", "logistic"], "split 'nope' is not in"),
                                (["--split", "test"], "needs --head"),
                                (["--split", "test", "--head", "logistic", str(folder)], "not both"),
                                (["--head", "logistic"], "--split SPLIT")):
        result = runner.invoke(app, ["predict", str(cache.path), *arguments])
        assert result.exit_code == 2 and fragment in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_finetune_trains_and_scores_only_labelled_rows(unlabeled_cache):
    cache, _ = unlabeled_cache
    fit_head(cache, FitSpec(head="logistic"))
    result = finetune(cache, FinetuneSpec(epochs=1, batch_size=8, workers=0, augment=False, precision="fp32"))
    assert result.record.get("test_metrics") is None


def test_cli_extract_with_unlabeled_reports_the_split(tmp_path):
    folder = _kaggle_folder(tmp_path / "k")
    result = runner.invoke(app, ["extract", str(folder), "--unlabeled", "test", "--weights", "random", "--model",
                                 "resnet18", "--image-size", "32", "--root", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "test 5 (unlabelled)" in result.output
    listing = runner.invoke(app, ["ls", str(tmp_path / "c")])
    assert "32 px" in listing.output and "pool" in listing.output
    missing = runner.invoke(app, ["extract", str(folder), "--unlabeled", "val2", "--weights", "random"])
    assert missing.exit_code == 2 and "no val2/ split folder" in missing.output


def test_csv_empty_labels_make_an_unlabeled_split(tmp_path, tiny_spec):
    for i in range(6):
        replicas.class_image(tmp_path / f"{i}.png", i % 2, i, size=32)
    (tmp_path / "list.csv").write_text("path,label,split\n0.png,10,train\n1.png,9,train\n2.png,10,train\n"
                                       "3.png,9,train\n4.png,,test\n5.png,,test\n")
    source = open_source(str(tmp_path / "list.csv"))
    assert source.classes == ["9", "10"]  # numeric labels in numeric order
    assert source.unlabeled_splits == ["test"]
    cache = open_cache(extract(tiny_spec(tmp_path / "list.csv", name="my-list")).path)
    assert cache.path.name.startswith("my-list-")
    assert cache.unlabeled_splits == ["test"] and list(cache.labels("test")) == [-1, -1]
    (tmp_path / "mixed.csv").write_text("path,label,split\n0.png,a,train\n1.png,b,train\n2.png,a,test\n3.png,,test\n")
    with pytest.raises(SourceError, match="mixes labelled and unlabelled"):
        open_source(str(tmp_path / "mixed.csv"))
