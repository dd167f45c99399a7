"""Pipeline files: validation that names file, line and field; reruns that do no work; the demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from featurecache import open_cache
from featurecache.cli import app
from featurecache.errors import UsageError
from featurecache.pipeline.demo import demo_pipeline, imagenet_weights_file
from featurecache.pipeline.runner import load_pipeline, run_pipeline
from helpers import stderr_lines

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 220)}

PIPELINE = """\
# a tiny pipeline: random ResNet18 at 32 px
[pipeline]
name = "tiny"

[extract]
source = "colours"
model = "resnet18"
weights = "random"
image_size = 32
taps = ["pool", "layer3"]
precision = "fp32"
workers = 0
batch_size = 16

[[heads]]
head = "logistic"

[[heads]]
head = "knn"
params = { k = [1, 3] }

[ensemble]
name = "vote"
members = ["logistic", "knn"]

[finetune]
head = "logistic"
unfreeze = "layer4"
epochs = 1
from_cache = true
batch_size = 5
workers = 0

[report]
worst = 4
"""


def _colour_folder(root):
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3), ("test", 3)):
        for label, colour in COLOURS.items():
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(rng.normal(colour, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


@pytest.fixture
def pipeline_file(tmp_path):
    _colour_folder(tmp_path / "colours")
    path = tmp_path / "tiny.toml"
    path.write_text(PIPELINE)
    return path


def _error(tmp_path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as caught:
        load_pipeline(path)
    return str(caught.value)


def _edit(old: str, new: str) -> str:
    assert old in PIPELINE
    return PIPELINE.replace(old, new)


def test_a_good_file_loads_into_specs(pipeline_file):
    pipeline = load_pipeline(pipeline_file)
    assert pipeline.name == "tiny"
    assert pipeline.extract.source == str(pipeline_file.parent / "colours")  # relative to the file
    assert pipeline.extract.taps == ("pool", "layer3") and pipeline.extract.image_size == 32
    assert [h.head for h in pipeline.heads] == ["logistic", "knn"] and pipeline.heads[1].params == {"k": [1, 3]}
    assert pipeline.ensemble.members == ("logistic", "knn")
    assert pipeline.finetune.from_cache and pipeline.finetune.epochs == 1
    assert pipeline.report.worst == 4


@pytest.mark.parametrize("old, new, expected", [
    ('image_size = 32', 'image_sise = 32', "bad.toml:9: extract.image_sise: unknown field; expected one of: source"),
    ('image_size = 32', 'image_size = "big"', "bad.toml:9: extract.image_size: must be an integer, got 'big'"),
    ('source = "colours"', 'source = "no/such/folder"', "bad.toml:6: extract.source: no such folder or CSV file"),
    ('source = "colours"', 'source = "cifar10:nowhere"', "bad.toml:6: extract.source: no such folder"),
    ('model = "resnet18"', 'model = "vgg99"', "bad.toml:7: extract.model: unknown model"),
    ('taps = ["pool", "layer3"]', 'taps = ["pool", "layer9"]', "bad.toml:10: extract.taps: unknown tap"),
    ('head = "knn"', 'head = "forest"', "bad.toml:19: heads[2].head: unknown head 'forest'"),
    ('params = { k = [1, 3] }', 'params = { kk = 3 }', "bad.toml:20: heads[2].params: head 'knn' has no parameter kk"),
    ('members = ["logistic", "knn"]', 'members = ["logistic", "svm"]',
     "bad.toml:24: ensemble.members: 'svm' is not a head of this pipeline"),
    ('members = ["logistic", "knn"]', 'members = []', "bad.toml:24: ensemble.members: name at least one head"),
    ('members = ["logistic", "knn"]', 'members = ["logistic", "logistic"]',
     "bad.toml:24: ensemble.members: a head is named twice (logistic)"),
    ('members = ["logistic", "knn"]', 'members = ["logistic", "knn"]\nweights = [nan, 1]',
     "bad.toml:25: ensemble.weights: one finite, non-negative weight per member"),
    ('epochs = 1', 'epochs = 1.5', "bad.toml:29: finetune.epochs: must be an integer"),
    ('taps = ["pool", "layer3"]', 'taps = ["pool"]', "bad.toml:30: finetune.from_cache: needs the activations of tap layer3"),
    ('worst = 4', 'colour = "blue"', "bad.toml:35: report.colour: unknown field"),
    ('[report]', '[reports]', "bad.toml:34: reports: unknown table"),
    ('name = "tiny"', 'name = "tiny"\ncolour = 1', "bad.toml:4: pipeline.colour: unknown field"),
    ('worst = 4', 'worst = [4', "bad.toml:35: not valid TOML: Unclosed array"),
    ('name = "vote"', 'name = vote', "bad.toml:23: not valid TOML"),
    ('weights = "random"', 'weights = "mine/resnet18.pth"',
     "bad.toml:8: extract.weights: weights file {tmp}/mine/resnet18.pth does not exist"),
    ('weights = "random"', 'weights = "colours"', "bad.toml:8: extract.weights: weights file {tmp}/colours is a folder"),
    ('name = "tiny"', 'name = "tiny"\nroot = "colours/train/red/0.png"',
     "bad.toml:4: pipeline.root: {tmp}/colours/train/red/0.png is a file, not a folder"),
    ('name = "tiny"', 'name = "tiny"\nroot = "colours/train/red/0.png/cache"',  # the run failed: Not a directory
     "bad.toml:4: pipeline.root: {tmp}/colours/train/red/0.png/cache is under {tmp}/colours/train/red/0.png, a file"),
    ('source = "colours"', 'source = "loop"', "bad.toml:6: extract.source: no such folder or CSV file {tmp}/loop"),
    # caught only after extract before: a tap not extracted, a report head not made, an ensemble across validations
    ('[[heads]]\nhead = "logistic"', '[[heads]]\nhead = "logistic"\ntap = "layer2"',
     "bad.toml:17: heads[1].tap: tap 'layer2' is not made by the extract step (its taps: pool, layer3)"),
    ('worst = 4', 'worst = 4\nhead = "nonexistent"',
     "bad.toml:36: report.head: 'nonexistent' is not a head of this pipeline (heads: logistic, knn, vote)"),
    ('params = { k = [1, 3] }', 'params = { k = [1, 3] }\nval_fraction = 0.2',
     "bad.toml:25: ensemble.members: 'logistic' is chosen on the val split and 'knn' on 0.2 of train with seed 0"),
    ('params = { k = [1, 3] }', 'params = { k = [1, 3] }\nval_fraction = 0.2\nseed = 1',  # val split or not
     "bad.toml:26: ensemble.members: 'logistic' is chosen on the val split and 'knn' on 0.2 of train with seed 1"),
])
def test_errors_name_the_file_the_line_and_the_field(tmp_path, old, new, expected):
    _colour_folder(tmp_path / "colours")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # Path.resolve raised RuntimeError: a traceback
    assert expected.format(tmp=tmp_path) in _error(tmp_path, _edit(old, new))


def test_heads_chosen_on_the_same_rows_and_a_report_on_a_pipeline_head_pass_the_check(tmp_path):
    """The check refuses only what would fail: without a val split, a head with no val_fraction carves
    0.2 of train with its seed, the rows val_fraction = 0.2 carves; the ensemble may be reported."""
    import shutil

    _colour_folder(tmp_path / "colours")
    both = _edit('params = { k = [1, 3] }', 'params = { k = [1, 3] }\nval_fraction = 0.2').replace(
        'worst = 4', 'worst = 4\nhead = "vote"')
    (tmp_path / "ok.toml").write_text(both.replace('[[heads]]\nhead = "logistic"',
                                                   '[[heads]]\nhead = "logistic"\nval_fraction = 0.2'))
    assert load_pipeline(tmp_path / "ok.toml").report.head == "vote"
    shutil.rmtree(tmp_path / "colours" / "val")  # no val split: no val_fraction means 0.2 of train, seed 0
    (tmp_path / "train-only.toml").write_text(both)
    assert load_pipeline(tmp_path / "train-only.toml").heads[1].val_fraction == 0.2


def test_run_refuses_an_ensemble_across_validations_before_extract(pipeline_file):
    pipeline_file.write_text(_edit('params = { k = [1, 3] }', 'params = { k = [1, 3] }\nval_fraction = 0.2'))
    result = runner.invoke(app, ["run", str(pipeline_file)])
    assert result.exit_code == 2 and len(stderr_lines(result)) == 1 and "ensemble.members" in result.stderr
    assert not (pipeline_file.parent / "cache").exists()


def test_a_weights_file_without_a_suffix_is_found_beside_the_pipeline(pipeline_file, tmp_path, monkeypatch):
    """Relative paths are relative to the file: a suffixless weights file was looked up in the
    working directory (and then refused as an unknown weights name)."""
    import torch
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "mine")
    pipeline_file.write_text(_edit('weights = "random"', 'weights = "mine"'))
    monkeypatch.chdir("/")
    assert load_pipeline(pipeline_file).extract.weights == str(tmp_path / "mine")


def test_missing_extract_and_missing_file(tmp_path):
    assert "bad.toml:1: missing the [extract] table" in _error(tmp_path, "[[heads]]\nhead = 'logistic'\n")
    result = runner.invoke(app, ["run", str(tmp_path / "absent.toml")])
    assert result.exit_code == 2 and "error: no pipeline file" in result.stderr


def test_run_check_validates_only(pipeline_file):
    result = runner.invoke(app, ["run", str(pipeline_file), "--check"])
    assert result.exit_code == 0, result.output
    assert "valid (2 heads, an ensemble, a finetune)" in result.stdout
    assert not (pipeline_file.parent / "cache").exists()
    image = pipeline_file.parent / "colours" / "train" / "red" / "0.png"
    result = runner.invoke(app, ["run", str(pipeline_file), "--check", "--root", str(image)])
    assert result.exit_code == 2 and result.stderr == f"error: --root: {image} is a file, not a folder; give a cache folder\n"


def test_run_twice_does_no_work_the_second_time(pipeline_file, tmp_path):
    pipeline = load_pipeline(pipeline_file)
    first = run_pipeline(pipeline)
    assert [s.step.split()[0] for s in first.steps] == ["extract", "head", "head", "ensemble", "finetune", "report"]
    assert not any(s.cached for s in first.steps)
    html = first.report_path.read_text()
    assert "Leaderboard" in html and "Finetune runs" in html
    files = sorted(p for p in first.cache_path.rglob("*") if p.is_file() and ".lock" not in p.name)
    before = {p: p.stat().st_mtime_ns for p in files}

    second = runner.invoke(app, ["run", str(pipeline_file)])
    assert second.exit_code == 0, second.output
    assert second.stdout.count("cached") == 6, second.stdout
    assert {p: p.stat().st_mtime_ns for p in files} == before  # nothing rewritten

    # Editing one head's settings redoes that head and what depends on it, nothing else.
    pipeline_file.write_text(PIPELINE.replace("k = [1, 3]", "k = [1, 2]"))
    third = run_pipeline(load_pipeline(pipeline_file))
    assert {s.step: s.cached for s in third.steps} == {
        "extract": True, "head logistic": True, "head knn": False, "ensemble vote": False,
        "finetune logistic-layer4-cache": True, "report": False}


def test_a_from_cache_finetune_is_kept_when_only_its_unused_augmentation_changes(pipeline_file):
    """--from-cache trains on cached activations, never augmented: the pipeline compared the
    augmentation settings anyway, and an edit of them discarded the finished run and trained it
    again. It now compares what the finetune command's resume check compares."""
    text = _edit('[[heads]]\nhead = "knn"\nparams = { k = [1, 3] }\n\n[ensemble]\nname = "vote"\n'
                 'members = ["logistic", "knn"]\n\n', "").replace("worst = 4", "worst = 0")
    pipeline_file.write_text(text)
    first = run_pipeline(load_pipeline(pipeline_file))
    run = first.cache_path / "finetune" / "logistic-layer4-cache"
    files = sorted(p for p in run.iterdir() if p.is_file())
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    assert {"checkpoint.safetensors", "finetune.json"} <= set(before)

    pipeline_file.write_text(text.replace("from_cache = true", "from_cache = true\naugment = false\nhflip = false\n"
                                          "crop_scale = [0.5, 1.0]"))
    kept = runner.invoke(app, ["run", str(pipeline_file)])
    assert kept.exit_code == 0, kept.output
    assert [line.split()[:3] for line in kept.stdout.splitlines() if line.startswith("finetune")] == [
        ["finetune", "logistic-layer4-cache", "cached"]]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before  # the run is untouched

    pipeline_file.write_text(text.replace("epochs = 1", "epochs = 1\nlr = 0.001"))  # a setting it uses
    redone = run_pipeline(load_pipeline(pipeline_file))
    assert {s.step: s.cached for s in redone.steps}["finetune logistic-layer4-cache"] is False
    record = json.loads((run / "finetune.json").read_text())
    assert (record["spec"]["lr"], record["complete"], record["epochs_done"]) == (0.001, True, 1)
    assert (run / "checkpoint.safetensors").read_bytes() != before["checkpoint.safetensors"][1]


def test_a_report_output_is_rewritten_only_when_it_is_the_pipelines_own_page(pipeline_file, tmp_path):
    """[report] output: each run rewrites the page featurecache wrote there (a pipeline has no
    --overwrite to give), but an existing file of another kind is refused before any step."""
    text = PIPELINE.split("[ensemble]")[0] + '[report]\nworst = 0\noutput = "page.html"\n'
    pipeline_file.write_text(text)
    page = tmp_path / "page.html"
    page.write_text("my notes")
    result = runner.invoke(app, ["run", str(pipeline_file), "-q"])
    assert result.exit_code == 2, result.output
    assert stderr_lines(result) == [f"error: {pipeline_file}: [report] output {page} exists and is not a "
                                    "featurecache report; delete it or choose another output"]
    assert page.read_text() == "my notes" and not (tmp_path / "cache").exists()
    page.unlink()
    assert run_pipeline(load_pipeline(pipeline_file)).report_path == page
    written = page.stat().st_mtime_ns
    pipeline_file.write_text(text.replace("k = [1, 3]", "k = [1, 2]"))  # a head changes: the page is redone
    again = run_pipeline(load_pipeline(pipeline_file))
    assert {s.step: s.cached for s in again.steps}["report"] is False and page.stat().st_mtime_ns != written
    unchanged = run_pipeline(load_pipeline(pipeline_file))
    assert {s.step: s.cached for s in unchanged.steps}["report"] is True
    inside, steps = unchanged.cache_path / "page.html", []
    pipeline_file.write_text(text.replace('"page.html"', f'"{inside}"'))
    with pytest.raises(UsageError, match=f"^{inside} lies inside the cache entry {unchanged.cache_path}, whose files"):
        run_pipeline(load_pipeline(pipeline_file), on_step=steps.append)
    assert steps == [] and not inside.exists()  # refused before the first step


def test_demo_uses_imagenet_weights_only_when_on_disk(tmp_path):
    pipeline, note = demo_pipeline()
    assert pipeline.extract.weights == "random" and "RANDOM weights" in note and "never downloads" in note
    assert pipeline.extract.source == "digits" and pipeline.extract.image_size == 112
    file = imagenet_weights_file("resnet50")
    file.parent.mkdir(parents=True)
    file.write_bytes(b"")  # only its presence matters here
    pipeline, note = demo_pipeline()
    assert pipeline.extract.weights == "imagenet" and "ImageNet weights" in note


def test_demo_runs_offline_end_to_end(tmp_path, monkeypatch):
    """The real `featurecache demo` command path, shrunk by --quick, on the first 400 of the
    1,797 digits (split by the demo's own code; CI runs the whole demo before the tests):
    extract and the finetune epoch took 50 s of this test on all of them."""
    import sklearn.datasets
    from sklearn.utils import Bunch

    digits = sklearn.datasets.load_digits()
    first = Bunch(images=digits.images[:400], target=digits.target[:400])
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda: first)
    root = tmp_path / "demo-cache"
    result = runner.invoke(app, ["demo", "--quick", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert "RANDOM weights" in result.stdout
    report = next(root.glob("digits-resnet18-*/report/report.html"))
    assert sum(open_cache(report.parent.parent).splits.values()) == 400  # the first 400 only
    assert f"report: {report.resolve()}" in result.stdout.replace("\n", "")
    html = report.read_text()
    for section in ("Dataset", "Leaderboard", "confusion matrix", "Learning curves", "PCA scatter plot", "Provenance"):
        assert section in html
    assert "vote" in html and "logistic-layer4-cache" in html
    again = runner.invoke(app, ["demo", "--quick", "--root", str(root)])
    assert "0 of 7 steps computed" in again.stdout


def test_shipped_pipelines_are_valid(tmp_path):
    from pathlib import Path

    shipped = Path(__file__).resolve().parent.parent / "pipelines"
    assert load_pipeline(shipped / "digits.toml").finetune.from_cache
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "data").mkdir()  # cifar10.toml reads ../data; imagefolder.toml a folder of the user's
    for name in ("cifar10.toml", "imagefolder.toml"):
        (tmp_path / "pipelines" / name).write_text((shipped / name).read_text())
    cifar = load_pipeline(tmp_path / "pipelines" / "cifar10.toml")
    assert cifar.extract.weights == "imagenet" and cifar.finetune.unfreeze == "layer4"
    assert [h.head for h in cifar.heads] == ["logistic", "mlp"] and cifar.ensemble.members == ("logistic", "mlp")
    with pytest.raises(UsageError, match=r"imagefolder.toml:\d+: extract.source: no such folder"):
        load_pipeline(tmp_path / "pipelines" / "imagefolder.toml")


def test_a_head_that_carved_by_position_is_fitted_again(tmp_path, monkeypatch):
    """A head fitted before carving went by path (no `carve` in its record) is not current: left as it
    was, an ensemble with a head fitted since would be refused as validated on other rows."""
    from featurecache.fit import stage

    _colour_folder(tmp_path / "colours")
    path = tmp_path / "carved.toml"
    path.write_text(PIPELINE.split("[[heads]]")[0] + '[[heads]]\nhead = "knn"\nparams = { k = 3 }\n'
                    'val_fraction = 0.3\n\n[report]\nworst = 0\n')
    validation = stage._validation
    monkeypatch.setattr(stage, "_validation", lambda *a: {k: v for k, v in validation(*a).items() if k != "carve"})
    assert not run_pipeline(load_pipeline(path)).steps[1].cached
    monkeypatch.setattr(stage, "_validation", validation)
    second = run_pipeline(load_pipeline(path)).steps[1]
    assert second.step == "head knn" and not second.cached
    assert run_pipeline(load_pipeline(path)).steps[1].cached
