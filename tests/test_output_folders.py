"""`-o new/dir/FILE` makes the missing folders only when it writes the result: a command that
fails after its argument checks leaves no new folder behind (predict, export, report, compare
and export-features made them before the work, and left them empty on failure)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from featurecache import extract
from featurecache.cli import app
from featurecache.extract.stage import ExtractSpec
from featurecache.fit.stage import FitSpec, fit_head
from helpers import flip_feature_byte, stderr_lines, write_photo_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    """A tiny entry (train 10, val 6) with a logistic head; its photos beside it."""
    base = tmp_path_factory.mktemp("output-folders")
    photos = write_photo_folder(base / "photos")
    path = extract(ExtractSpec(source=str(photos), model="resnet18", weights="random", image_size=32,
                               precision="fp32", dtype="float32", batch_size=8, workers=0, shard_size=8,
                               root=str(base / "cache"))).path
    fit_head(path, FitSpec(head="logistic", params={"C": 1.0}))
    return path


def cli(*arguments):
    return CliRunner().invoke(app, [str(a) for a in arguments])


NO_HEAD = "error: no head 'nope' on {name} (heads: logistic); fit one with featurecache fit-head"
FAILING = {  # a command whose -o is fine but which fails afterwards, and its one error line
    "predict": (["predict", "{entry}", "--split", "val", "--head", "nope", "-o", "{out}/p.csv"], NO_HEAD),
    "export": (["export", "{entry}", "--head", "nope", "-o", "{out}/model.pt"], NO_HEAD),
    "report": (["report", "{entry}", "--head", "nope", "-o", "{out}/report.html"], NO_HEAD),
    "compare": (["compare", "{photos}", "--model", "resnet18", "--model", "nosuch", "--weights", "random",
                 "-o", "{out}/compare.html"], "error: unknown model 'nosuch'"),
}


@pytest.mark.parametrize("command", list(FAILING))
def test_a_command_that_fails_after_its_checks_makes_no_folder(command, entry, tmp_path):
    arguments, expected = FAILING[command]
    result = cli(*(a.format(entry=entry, photos=entry.parent.parent / "photos", out=tmp_path / "new" / "dir")
                   for a in arguments))
    assert result.exit_code == 2, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith(expected.format(name=entry.name)), lines
    assert not (tmp_path / "new").exists()


def test_a_failed_export_features_removes_the_folders_it_made(entry, tmp_path):
    """A damaged shard fails the export once it has begun writing: -o's missing folders go too."""
    shard = entry / "shards" / "val-00000.h5"
    flip_feature_byte(shard, "pool", 0)
    try:
        result = cli("export-features", entry, "-o", tmp_path / "new" / "dir" / "features")
    finally:
        flip_feature_byte(shard, "pool", 0)  # the same byte flipped back: the entry is whole again
    assert result.exit_code == 1 and "fails its checksum" in stderr_lines(result)[0], result.output
    assert len(stderr_lines(result)) == 1 and list(tmp_path.iterdir()) == []


def test_the_folders_are_made_when_the_result_is_written(entry, tmp_path):
    out = tmp_path / "new" / "dir"
    assert cli("predict", entry, "--split", "val", "--head", "logistic", "-o", out / "p.csv").exit_code == 0
    assert cli("export-features", entry, "-o", out / "features").exit_code == 0
    assert (out / "p.csv").read_text().startswith("path,class1,prob1")
    assert sorted(p.name for p in out.iterdir()) == ["features", "p.csv"]
    assert (out / "features" / "val" / "features.npy").is_file()
