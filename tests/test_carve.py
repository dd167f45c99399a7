"""Validation carved from train (--val-fraction) is decided by the rows' paths, not their positions.

An incremental extract appends the new files' shards after the old ones, so an entry
updated with new files and one made in one go (same id, same key) hold the same rows in
different orders: both must carve the same validation rows and score the same.
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from featurecache.cache.store import open_cache
from featurecache.cli import app
from featurecache.errors import HeadError
from featurecache.extract.stage import ExtractSpec, extract
from featurecache.fit.carve import carve
from featurecache.fit.stage import FitSpec, fit_head, make_ensemble
from helpers import write_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLASSES = ("ant", "bee", "cat")
CARVED = dict(val_fraction=0.3, seed=2)


def _images(folder, numbers) -> None:
    for c, label in enumerate(CLASSES):
        for i in numbers:  # one colour per class under the noise: a head has something to learn
            write_image(folder / "train" / label / f"{i}.png", 100 * c + i, size=16)


def _spec(folder, root, image_size=32) -> ExtractSpec:
    return ExtractSpec(source=str(folder), model="resnet18", weights="random", image_size=image_size,
                       precision="fp32", dtype="float32", batch_size=8, workers=0, shard_size=4, root=str(root))


def _carved_paths(cache, **carving) -> list[str]:
    paths = cache.paths("train")
    return sorted(paths[i] for i in carve(cache, carving["val_fraction"], carving["seed"])[1])


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    """RA: extracted with files 5-9 of each class, then again after 0-4 were added (appended after
    them); RB: the same folder in one go, in another root. Same id and key, other row order."""
    base = tmp_path_factory.mktemp("carve")
    folder = base / "photos"
    _images(folder, range(5, 10))
    extract(_spec(folder, base / "a"))
    _images(folder, range(5))
    ra, rb = open_cache(extract(_spec(folder, base / "a")).path), open_cache(extract(_spec(folder, base / "b")).path)
    return ra, rb, folder, base


def test_entries_in_other_row_orders_carve_the_same_rows_and_score_the_same(entries):
    ra, rb, _, _ = entries
    assert ra.path.name == rb.path.name and ra.key == rb.key
    assert ra.paths("train") != rb.paths("train") and sorted(ra.paths("train")) == sorted(rb.paths("train"))
    carved = _carved_paths(ra, **CARVED)
    assert carved == _carved_paths(rb, **CARVED)
    assert [sum(p.split("/")[-2] == label for p in carved) for label in CLASSES] == [3, 3, 3]  # stratified
    assert carved != _carved_paths(ra, val_fraction=0.3, seed=3)  # seeded
    records = [fit_head(cache, FitSpec(head="knn", name="carved", params={"k": 3}, **CARVED)).record
               for cache in (ra, rb)]
    assert records[0]["metrics"] == records[1]["metrics"]
    assert records[0]["validation"] == {"split": "train", "fraction": 0.3, "seed": 2, "carve": "path",
                                        "trained_on": False}
    from featurecache.finetune.stage import _split_rows  # finetune starts from the head's own validation rows

    for cache, record in zip((ra, rb), records):
        paths = cache.paths("train")
        assert sorted(paths[i] for i in _split_rows(cache, record)["val"][1]) == carved


def test_heads_carved_by_position_keep_their_rows_and_are_not_mixed_with_heads_carved_by_path():
    from featurecache.fit.carve import carved_rows, stratified_split
    from featurecache.fit.stage import shared_validation

    class Entry:  # what carved_rows reads of a cache
        def labels(self, split):
            return np.repeat(np.arange(3), 6)

        def paths(self, split):
            return [f"train/{c}/{i}.png" for c in "abc" for i in reversed(range(6))]

    old = {"split": "train", "fraction": 0.3, "seed": 2, "trained_on": False}  # fitted before: no "carve"
    assert list(carved_rows(Entry(), old)[1]) == list(stratified_split(Entry().labels("train"), 0.3, 2)[1])
    with pytest.raises(HeadError, match="carved by row position"):
        shared_validation({"old": {"validation": old}, "new": {"validation": {**old, "carve": "path"}}})


def test_an_ensemble_across_entries_in_other_row_orders_leaves_no_carved_row_out(entries, caplog):
    ra, _, folder, base = entries
    other = open_cache(extract(_spec(folder, base / "a", image_size=40)).path)  # one go: source order
    assert other.paths("train") != ra.paths("train")
    for cache in (ra, other):
        fit_head(cache, FitSpec(head="knn", name="carved", params={"k": 3}, overwrite=True, **CARVED))
    record = make_ensemble(ra, ["carved", (other.path.name, "carved")], name="vote", overwrite=True).record
    assert record["alignment"]["val (from train)"]["left_out"] == 0
    assert record["metrics"]["val (from train)"]["n"] == 9
    assert "left out" not in caplog.text
    fit_head(other, FitSpec(head="knn", name="seed3", params={"k": 3}, val_fraction=0.3, seed=3))
    with pytest.raises(HeadError, match="validated on different rows.*seed 2.*seed 3"):
        make_ensemble(ra, ["carved", (other.path.name, "seed3")], name="mixed")


def test_rows_carved_into_training_by_another_entry_are_said_so(tmp_path, caplog):
    """The same settings carve other rows from entries whose train splits hold other files: those
    rows are left out (a member trained on them), said as such, not as rows an entry lacks."""
    folder = tmp_path / "photos"
    _images(folder, range(10))
    first = open_cache(extract(_spec(folder, tmp_path / "cache")).path)
    gone = next(p for p in _carved_paths(first, **CARVED) if "/ant/" in p)
    (folder / gone).write_bytes(b"damaged after the first extraction")  # the second entry lacks it
    second = open_cache(extract(_spec(folder, tmp_path / "cache", image_size=40)).path)
    assert gone not in second.paths("train")
    for cache in (first, second):
        fit_head(cache, FitSpec(head="knn", name="carved", params={"k": 3}, **CARVED))
    record = make_ensemble(first, ["carved", (second.path.name, "carved")], name="vote").record
    alignment = record["alignment"]["val (from train)"]
    assert alignment["left_out"] == 2 and alignment["carved_into_training"] == 1
    assert alignment["missing"] == {f"{second.path.name}:carved": 1}
    assert f"1 not in every member's entry (1 missing from {second.path.name}:carved" in caplog.text
    assert f"1 carved into training by another member's entry (1 trained on by {first.path.name}:carved" in caplog.text
    result = CliRunner().invoke(app, ["ensemble", str(first.path), "carved", f"{second.path.name}:carved",
                                      "--name", "vote2"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "1 val (from train) row(s) are not in every member's entry" in said
    assert "1 val (from train) row(s) were carved into training by another member's entry" in said
    from featurecache.report.page import ReportSpec, build_report

    html = build_report(first, ReportSpec(output=str(tmp_path / "page.html"), worst=0, max_points=10)).path.read_text()
    assert "1 val (from train) row(s) not in every entry were left out" in html
    assert "1 val (from train) row(s) carved into training by another member's entry" in html
