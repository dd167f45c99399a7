"""Soft voting across entries of one source: heads fitted on two backbones' caches, rows matched by path.

One tiny image folder, extracted with a random resnet18, then (after one val image is
damaged and one test image added) with a random timm ConvNeXt-atto: each entry holds a
row the other lacks, so an alignment by position would pair the wrong images.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from featurecache.cache.manifest import read_manifest, write_manifest
from featurecache.cache.schema import check_head_record
from featurecache.cache.store import open_cache
from featurecache.cli import app
from featurecache.errors import CorruptCacheError, HeadError, InvalidRecordError, MismatchError, StaleError
from featurecache.extract.stage import ExtractSpec, extract
from featurecache.fit.cross_ensemble import cross_split_probabilities
from featurecache.fit.headstore import leaderboard, load_head
from featurecache.fit.stage import FitSpec, fit_head, make_ensemble
from featurecache.heads.metrics import classification_metrics
from featurecache.report.page import ReportSpec, build_report, report_inputs
from featurecache.serve.predict import load_predictor, predict, predict_split
from helpers import stderr_lines

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 220)}
WEIGHTS = (1.0, 3.0)  # normalised: 0.25, 0.75
DAMAGED, ADDED = "val/blue/0.png", "test/blue/-new.png"  # each the first row of its sorted split


def _image(path, colour, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(rng.normal(colour, 60, (24, 24, 3)), 0, 255).astype(np.uint8)).save(path)


def _folder(root, counts=(("train", 5), ("val", 3), ("test", 3)), classes=COLOURS):
    rng = np.random.default_rng(0)
    for split, count in counts:
        for label, colour in classes.items():
            for i in range(count):
                _image(root / split / label / f"{i}.png", colour, rng)
    return root


def _spec(folder, root, model) -> ExtractSpec:
    return ExtractSpec(source=str(folder), model=model, weights="random", image_size=32, precision="fp32",
                       dtype="float32", batch_size=16, workers=0, root=str(root), optimize="eager")


@pytest.fixture(scope="module")
def _template(tmp_path_factory):
    base = tmp_path_factory.mktemp("cross")
    folder = _folder(base / "colours")
    first = extract(_spec(folder, base / "cache", "resnet18")).path
    (folder / DAMAGED).write_bytes(b"damaged after the first extraction")
    _image(folder / ADDED, COLOURS["blue"], np.random.default_rng(1))
    second = extract(_spec(folder, base / "cache", "timm:convnext_atto")).path
    for path in (first, second):
        fit_head(open_cache(path), FitSpec(head="logistic"))
    return first, second, folder


@pytest.fixture
def entries(_template, tmp_path):
    """Fresh copies of both entries under this test's cache root (FEATURECACHE_ROOT)."""
    first, second, folder = _template
    shutil.copytree(first.parent, tmp_path / "cache", dirs_exist_ok=True)
    return open_cache(tmp_path / "cache" / first.name), open_cache(tmp_path / "cache" / second.name), folder


def _vote(a, b, **options):
    return make_ensemble(a, ["logistic", (b.path.name, "logistic")], name="vote", weights=list(WEIGHTS), **options)


def _by_hand(caches, split):
    """Each member's own probabilities on its own entry, then the weighted mean over the common paths."""
    rows = []
    for cache in caches:
        head, _ = load_head(cache, "logistic")
        probabilities = head.predict_proba(cache.features(split))
        rows.append({p: (probabilities[i], cache.labels(split)[i]) for i, p in enumerate(cache.paths(split))})
    common = [p for p in rows[0] if p in rows[1]]
    weights = np.asarray(WEIGHTS) / sum(WEIGHTS)
    expected = np.stack([weights[0] * rows[0][p][0] + weights[1] * rows[1][p][0] for p in common])
    return common, expected, np.asarray([rows[0][p][1] for p in common])


def test_vote_on_cached_splits_is_the_weighted_mean_matched_by_path(entries):
    a, b, _ = entries
    assert DAMAGED not in b.paths("val") and DAMAGED in a.paths("val")
    assert ADDED in b.paths("test") and ADDED not in a.paths("test")
    record = _vote(a, b).record
    assert record["head"] == "cross-ensemble" and record["weights"] == [0.25, 0.75]
    for split, missing in (("val", DAMAGED), ("test", ADDED)):
        common, expected, labels = _by_hand((a, b), split)
        voted = cross_split_probabilities(a, "vote", split)
        assert voted.paths == common and missing not in common
        np.testing.assert_allclose(voted.probabilities, expected, atol=1e-6)
        np.testing.assert_array_equal(voted.labels, labels)
        metrics = classification_metrics(expected, labels, a.classes)
        assert record["metrics"][split]["n"] == len(common) == len(a.paths(split)) + (split == "test") - 1
        assert record["metrics"][split]["log_loss"] == pytest.approx(metrics["log_loss"], abs=1e-9)
        assert record["alignment"][split]["left_out"] == 1 and record["alignment"][split]["examples"] == [missing]
        # The check is sensitive to alignment: pairing the entries' rows by position gives other numbers.
        n = min(len(a.paths(split)), len(b.paths(split)))
        by_position = 0.25 * load_head(a, "logistic")[0].predict_proba(a.features(split)[:n]) \
            + 0.75 * load_head(b, "logistic")[0].predict_proba(b.features(split)[:n])
        assert not np.allclose(by_position, expected[:n], atol=1e-3)
    assert record["alignment"]["val"]["missing"] == {f"{b.path.name}:logistic": 1}
    assert record["alignment"]["test"]["missing"] == {f"{a.path.name}:logistic": 1}
    assert record["headline"]["split"] == "test"
    row = next(r for r in leaderboard(a) if r["name"] == "vote")
    assert not row["stale"] and row["left_out"] == {"val": 1, "test": 1}
    assert row["entries"] == [f"{a.path.name}:logistic", f"{b.path.name}:logistic"]


def test_predict_split_matches_by_path_and_names_the_rows_left_out(entries):
    a, b, _ = entries
    _vote(a, b)
    common, expected, _ = _by_hand((a, b), "val")
    results = {r.path: r for r in predict_split(a, "vote", "val", top_k=3)}
    assert set(results) == set(a.paths("val"))
    assert results[DAMAGED].top == [] and b.path.name in results[DAMAGED].error
    for path, row in zip(common, expected):
        got = dict(results[path].top)
        np.testing.assert_allclose([got[c] for c in a.classes], row, atol=1e-6)


def test_predict_on_images_is_the_weighted_mean_of_each_members_predict(entries):
    a, b, folder = entries
    _vote(a, b)
    images = [folder / "test" / "green", folder / "val" / "red"]
    voted = predict(load_predictor(a, "vote"), images, top_k=3)
    members = [predict(load_predictor(cache, "logistic"), images, top_k=3) for cache in (a, b)]
    assert len(voted) == 6
    for mine, first, second in zip(voted, *members):
        assert mine.path == first.path == second.path and not mine.error
        got, p, q = dict(mine.top), dict(first.top), dict(second.top)
        np.testing.assert_allclose([got[c] for c in a.classes], [0.25 * p[c] + 0.75 * q[c] for c in a.classes],
                                   atol=1e-5)
        assert abs(sum(got.values()) - 1) < 1e-5


def test_cli_ensemble_across_entries_warns_lists_and_refuses_export(entries, tmp_path):
    a, b, folder = entries
    result = runner.invoke(app, ["ensemble", a.path.name, "logistic", f"{b.path.name}:logistic", "--name", "vote",
                                 "--weights", "1,3"])
    assert result.exit_code == 0, result.output
    assert "1 val row(s) are not in every member's entry" in result.output
    assert "1 test row(s) are not in every member's entry" in result.output
    heads = runner.invoke(app, ["heads", a.path.name])
    assert heads.exit_code == 0 and "vote (cross-ensemble)" in heads.output
    verified = runner.invoke(app, ["verify", a.path.name])  # a vote is out of one entry's reach, not damage
    assert verified.exit_code == 0, verified.output
    exported = runner.invoke(app, ["export", a.path.name, "--head", "vote", "-o", str(tmp_path / "model.pt")])
    assert exported.exit_code == 2 and not (tmp_path / "model.pt").exists()
    assert "votes across cache entries" in _one_line_error(exported) and "export each member" in exported.stderr
    output = tmp_path / "predictions.csv"
    predicted = runner.invoke(app, ["predict", a.path.name, str(folder / "test" / "red"), "--head", "vote",
                                    "--top-k", "3", "-o", str(output)])
    assert predicted.exit_code == 0, predicted.output
    lines = output.read_text().splitlines()
    assert len(lines) == 1 + 3 and all(line.split(",")[1] in a.classes for line in lines[1:])


def test_stale_after_a_member_is_fitted_again_or_its_entry_deleted(entries):
    a, b, _ = entries
    _vote(a, b)
    fit_head(b, FitSpec(head="logistic", params={"C": 0.5}, overwrite=True))
    assert next(r for r in leaderboard(a) if r["name"] == "vote")["stale"]
    expected = (f"featurecache ensemble {a.path.name} logistic {b.path.name}:logistic --name vote "
                "--weights 0.25,0.75 --overwrite")
    for use in (lambda: load_predictor(a, "vote"), lambda: cross_split_probabilities(a, "vote", "test")):
        with pytest.raises(StaleError, match="fitted again") as caught:
            use()
        assert expected in str(caught.value)
    result = runner.invoke(app, ["predict", a.path.name, "--split", "test", "--head", "vote"])
    assert result.exit_code == 2 and "is stale" in _one_line_error(result)
    _vote(a, b, overwrite=True)  # made again: current
    assert not next(r for r in leaderboard(a) if r["name"] == "vote")["stale"]
    manifest = read_manifest(b.path)
    write_manifest(b.path, {**manifest, "key": "f" * 64})  # as extract writes it after the source changed
    with pytest.raises(StaleError, match="extracted again"):
        load_predictor(a, "vote")
    write_manifest(b.path, manifest)
    assert not next(r for r in leaderboard(a) if r["name"] == "vote")["stale"]
    shutil.rmtree(b.path)
    with pytest.raises(StaleError, match="entry is gone"):
        load_predictor(a, "vote")


def test_carved_validation_scores_the_carved_rows_only(entries):
    a, b, _ = entries
    for cache in (a, b):
        fit_head(cache, FitSpec(head="logistic", name="carved", val_fraction=0.4, seed=3))
    record = make_ensemble(a, ["carved", (b.path.name, "carved")], name="vote").record
    member = load_head(a, "carved")[1]
    carved = member["metrics"]["val (from train)"]["n"]
    assert 0 < carved < a.splits["train"] // 2  # the same train rows in both entries: the same carved rows
    assert record["metrics"]["val (from train)"]["n"] == carved
    assert record["alignment"]["val (from train)"]["left_out"] == 0
    assert record["validation"] == {"split": "train", "fraction": 0.4, "seed": 3, "carve": "path",
                                    "trained_on": False}
    with pytest.raises(HeadError, match="validated on different rows"):
        make_ensemble(a, ["carved", (b.path.name, "logistic")], name="mixed")


def test_another_source_or_class_list_is_refused(entries, tmp_path):
    a, _, folder = entries
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)  # the same images under another root: another source
    other = extract(_spec(copy, a.path.parent, "resnet18")).path
    renamed = _folder(tmp_path / "renamed", counts=(("train", 2), ("val", 1)),
                      classes={"red": (220, 30, 30), "green": (30, 200, 40), "cyan": (40, 200, 220)})
    classes = extract(_spec(renamed, a.path.parent, "resnet18")).path
    for entry, fragment in ((other, "another source"), (classes, "other classes")):
        result = runner.invoke(app, ["ensemble", a.path.name, "logistic", f"{entry.name}:logistic", "--name", "v"])
        assert result.exit_code == 2 and fragment in _one_line_error(result)
    assert not (a.path / "heads" / "v").exists()
    result = runner.invoke(app, ["ensemble", a.path.name, "logistic", ":logistic"])
    assert result.exit_code == 2 and "ENTRY:HEAD" in _one_line_error(result)


def test_a_vote_across_entries_is_not_applied_to_one_entrys_features(entries):
    a, b, _ = entries
    _vote(a, b)
    with pytest.raises(MismatchError, match="votes across cache entries"):
        load_head(a, "vote")
    with pytest.raises(MismatchError, match="votes across cache entries"):
        make_ensemble(a, ["logistic", "vote"], name="nested")
    with pytest.raises(HeadError, match="named twice"):
        make_ensemble(a, ["logistic", (a.path, "logistic")], name="twice")


def test_rows_that_cannot_be_matched_by_path_are_refused(entries, monkeypatch):
    a, b, _ = entries
    labels = b.labels
    vote = lambda: make_ensemble(a, ["logistic", (b, "logistic")], name="vote")  # noqa: E731  (this Cache object)
    monkeypatch.setattr(b, "labels", lambda split: (labels(split) + (split == "test")) % len(b.classes))
    with pytest.raises(MismatchError, match="labelled differently"):
        vote()
    monkeypatch.setattr(b, "labels", labels)
    paths = b.paths
    monkeypatch.setattr(b, "paths", lambda split: paths(split)[:1] + paths(split)[:-1])
    with pytest.raises(CorruptCacheError, match="twice"):
        vote()
    assert not (a.path / "heads" / "vote").exists()


def test_a_path_whose_file_changed_between_the_extractions_is_refused(entries):
    """The same path, another image: the two entries' features of it describe different files."""
    a, b, folder = entries
    changed = folder / "test" / "red" / "0.png"
    saved, stat = changed.read_bytes(), changed.stat()
    try:
        changed.write_bytes((folder / "test" / "blue" / "0.png").read_bytes())  # another image at the same path
        again = open_cache(extract(_spec(folder, a.path.parent, "resnet18")).path)
    finally:
        changed.write_bytes(saved)
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert again.path == a.path and again.key != a.key  # the same entry, extracted again from the current files
    fit_head(again, FitSpec(head="logistic", overwrite=True))
    with pytest.raises(MismatchError, match="test/red/0.png is another file in .* changed between"):
        make_ensemble(again, ["logistic", (b.path.name, "logistic")], name="vote")
    assert not (a.path / "heads" / "vote").exists()
    

def test_fingerprints_are_compared_only_when_both_entries_take_them_alike(entries, monkeypatch):
    a, b, _ = entries
    monkeypatch.setattr(b, "fingerprints", lambda split: ["0" * 32] * b.splits[split])
    with pytest.raises(MismatchError, match="another file"):
        make_ensemble(a, ["logistic", (b, "logistic")], name="vote")
    b.manifest["fingerprints"] = "content"  # a hash of the bytes against (size, mtime): never equal, so not compared
    assert make_ensemble(a, ["logistic", (b, "logistic")], name="vote").record["alignment"]["test"]["left_out"] == 1


def test_report_lists_the_vote_and_its_mistakes(entries, tmp_path):
    a, b, _ = entries
    _vote(a, b)
    spec = ReportSpec(output=str(tmp_path / "out" / "report.html"), head="vote")
    html = build_report(a, spec).path.read_text()
    assert f"vote votes across entries: {a.path.name}:logistic, {b.path.name}:logistic" in html
    assert "1 val row(s) not in every entry were left out" in html and "1 test row(s)" in html
    assert "Head <b>vote</b> (cross-ensemble) on the test split" in html
    assert "over 9 images" in html
    before = report_inputs(a, spec)
    fit_head(b, FitSpec(head="logistic", params={"C": 0.5}, overwrite=True))  # the vote turns stale: a new page
    assert report_inputs(a, spec) != before


def test_record_schema_refuses_a_tampered_member_entry(entries):
    a, b, _ = entries
    record = _vote(a, b).record
    check_head_record(record, "head.json")
    for change, fragment in (({"entry": ".."}, "cross_members.1: .*is not a folder name"),
                             ({"entry": "../elsewhere"}, "cross_members.1.entry: String should match pattern"),
                             ({"cache_key": "0" * 12}, "cross_members.1.cache_key: String should match pattern")):
        bad = json.loads(json.dumps(record))
        bad["cross_members"][1].update(change)
        bad["config"]["params"]["members"][1] = f"{bad['cross_members'][1]['entry']}:logistic"
        with pytest.raises(InvalidRecordError, match=fragment):
            check_head_record(bad, "head.json")
    bad = json.loads(json.dumps(record))
    bad["config"]["params"]["members"].reverse()
    with pytest.raises(InvalidRecordError, match="config.params.members differs"):
        check_head_record(bad, "head.json")
    bad = json.loads(json.dumps(record))
    bad["weights"] = [1.0]
    with pytest.raises(InvalidRecordError, match="weights"):
        check_head_record(bad, "head.json")


def _one_line_error(result) -> str:
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]
