"""The HTML report: zero, one and many heads, after a finetune, and rendered in Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from featurecache import ExtractSpec, extract, open_cache
from featurecache.cli import app
from featurecache.fit.stage import FitSpec, fit_head, make_ensemble
from featurecache.report.page import ReportSpec, build_report
from helpers import stderr_lines

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 220)}


@pytest.fixture(scope="module")
def _template(tmp_path_factory):
    """One small extracted cache (with the layer3 tap, for a fast finetune) and one unreadable file."""
    base = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3), ("test", 3)):
        for label, colour in COLOURS.items():
            (base / "colours" / split / label).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(rng.normal(colour, 60, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(base / "colours" / split / label / f"{i}.png")
    (base / "colours" / "train" / "red" / "broken.png").write_bytes(b"not an image")
    spec = ExtractSpec(source=str(base / "colours"), model="resnet18", weights="random", image_size=32,
                       taps=("pool", "layer3"), precision="fp32", batch_size=16, workers=0, root=str(base / "cache"))
    return extract(spec).path


@pytest.fixture
def cache(_template, tmp_path):
    shutil.copytree(_template.parent, tmp_path / "cache", dirs_exist_ok=True)
    return open_cache(tmp_path / "cache" / _template.name)


def _build(cache, tmp_path, **options):
    result = build_report(cache, ReportSpec(output=str(tmp_path / "out" / "report.html"), **options))
    return result, result.path.read_text()


def test_zero_heads(cache, tmp_path):
    result, html = _build(cache, tmp_path)
    assert result.head is None
    assert "No head fitted yet" in html and "featurecache fit-head" in html
    assert "broken.png" in html  # skipped files and why
    assert "PCA scatter plot" in html and "<script" not in html
    assert [p.name for p in result.figures] == ["report-pca.png"]
    assert all(p.stat().st_size > 1000 for p in result.figures)


def test_one_head(cache, tmp_path):
    fit_head(cache, FitSpec(head="logistic"))
    result, html = _build(cache, tmp_path, worst=20)
    assert result.head == "logistic"
    assert 'alt="confusion matrix"' in html and 'alt="per-class accuracy"' in html
    assert cache.key in html and cache.manifest["weights"]["sha256"] in html  # provenance
    assert {p.name for p in result.figures} == {"report-confusion.png", "report-per-class.png", "report-pca.png"}
    assert "No MLP head or finetune run yet" in html


def test_many_heads_and_ensemble(cache, tmp_path):
    fit_head(cache, FitSpec(head="logistic"))
    fit_head(cache, FitSpec(head="knn"))
    fit_head(cache, FitSpec(head="mlp", params={"epochs": 5, "lr": 1e-3, "weight_decay": 1e-4}))
    make_ensemble(cache, ["logistic", "knn", "mlp"], name="vote")
    result, html = _build(cache, tmp_path, tsne=True)
    for name in ("logistic", "knn", "mlp", "vote"):
        assert f"<td>{name}</td>" in html
    assert 'alt="learning curves"' in html and 'alt="t-SNE scatter plot"' in html
    assert (tmp_path / "out" / "report-curves.png").exists()


def test_after_a_finetune(cache, tmp_path):
    from featurecache.finetune.stage import FinetuneSpec, finetune

    fit_head(cache, FitSpec(head="logistic"))
    finetune(cache, FinetuneSpec(head="logistic", unfreeze="layer4", epochs=2, from_cache=True, batch_size=5,
                                 workers=0))
    result, html = _build(cache, tmp_path)
    assert "Finetune runs" in html and "logistic-layer4-cache" in html
    assert 'alt="learning curves"' in html


def test_an_unfinished_finetune_run_is_marked_where_its_numbers_are(cache, tmp_path, monkeypatch):
    """A run stopped after 1 of 2 epochs was listed like a finished one (epochs 1, its best val
    top-1 as its score) with only "no (resumable)" at the row's end: its row, epochs, score and
    curve now say unfinished, and a warning under the table gives the command that finishes it."""
    import html as escape
    import json
    import re

    from featurecache.finetune.stage import FinetuneSpec, finetune
    from featurecache.report import plots

    labels = []
    drawn = plots.learning_curves
    monkeypatch.setattr(plots, "learning_curves", lambda curves: labels.append([c["label"] for c in curves])
                        or drawn(curves))
    fit_head(cache, FitSpec(head="logistic"))
    spec = FinetuneSpec(head="logistic", unfreeze="layer4", epochs=2, from_cache=True, batch_size=5, workers=0,
                        name="half")

    def stop(event):
        if event["phase"] == "train" and event["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(cache, spec, progress=stop)

    def row_and_warnings():
        page = _build(cache, tmp_path, worst=0, overwrite=True)[1]
        row = re.search(r"<tr><td>half[^<]*</td>.*?</tr>", page).group(0)
        return re.findall(r"<td[^>]*>(.*?)</td>", row), re.findall(r"<p class=warn>(.*?)</p>", page)

    record = json.loads((cache.path / "finetune" / "half" / "finetune.json").read_text())
    before, best = (f"{100 * v:.1f}" for v in (record["history"][0]["val_top1"], record["best_val_top1"]))
    cells, warnings = row_and_warnings()
    assert cells == ["half (unfinished)", "logistic", "layer4 (2 blocks)", "cached activations", "1 of 2", before,
                     f"{best} so far", "–", "no (resumable)"]
    command = f"featurecache finetune {cache.path} --name half --head logistic --unfreeze layer4 --epochs 2 " \
              "--batch-size 5 --from-cache"
    assert warnings[1:] == [escape.escape(  # the first: random weights
        f"finetune run 'half' is unfinished (1 of 2 epochs); rerun the finetune command to finish it: {command}; "
        "until then its numbers are those of its best epoch so far, not a result.")]
    assert labels[-1] == ["finetune half (unfinished)"]

    record = finetune(cache, spec).record  # finished: shown as a result, nothing said
    cells, warnings = row_and_warnings()
    assert cells == ["half", "logistic", "layer4 (2 blocks)", "cached activations", "2", before,
                     f"{100 * record['best_val_top1']:.1f}", f"{100 * record['test_metrics']['top1']:.1f}", "yes"]
    assert len(warnings) == 1 and labels[-1] == ["finetune half"]


def test_cli_report_command(cache, tmp_path):
    result = runner.invoke(app, ["report", str(cache.path), "--worst", "0"])
    assert result.exit_code == 0, result.output
    page = cache.path / "report" / "report.html"
    assert f"report: {page}" in result.stdout and page.exists()
    bad = runner.invoke(app, ["report", str(cache.path), "--head", "nope"])
    assert bad.exit_code == 2 and "error: no head 'nope'" in bad.stderr


def test_report_o_replaces_a_file_only_with_overwrite(cache, tmp_path):
    """-o replaced any existing file, and the PNGs written next to the page, silently (a reviewer's
    find); the entry's own report (no -o) is still rewritten on each run."""
    page, figure = tmp_path / "page.html", tmp_path / "old-pca.png"
    page.write_text("mine")
    figure.write_bytes(b"mine too")
    for output, taken in ((page, page), (tmp_path / "old.html", figure)):
        result = runner.invoke(app, ["report", str(cache.path), "-o", str(output), "--worst", "0"])
        assert result.exit_code == 2, result.output
        where = f"-o {output}" + ("" if taken == output else f": {taken}") + " exists"
        where += "" if taken == output else " (the page's figures go next to it)"
        assert stderr_lines(result) == [f"error: {where}; pass --overwrite to replace it, or choose another name"]
    assert page.read_text() == "mine" and figure.read_bytes() == b"mine too" and not (tmp_path / "old.html").exists()
    result = runner.invoke(app, ["report", str(cache.path), "-o", str(page), "--overwrite", "--worst", "0"])
    assert result.exit_code == 0, result.output
    assert page.read_text().startswith("<!doctype html>") and (tmp_path / "page-pca.png").exists()
    for _ in range(2):
        result = runner.invoke(app, ["report", str(cache.path), "--worst", "0"])
        assert result.exit_code == 0 and result.stderr == "", result.output


def test_report_o_refuses_a_path_it_would_break(cache, tmp_path, monkeypatch):
    """Inside the cache entry (even with --overwrite: the page could replace its files), under a
    file, and '-': one line, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in sorted(cache.path.rglob("*")) if p.is_file()}
    for arguments, expected in (
            ([str(cache.path / "manifest.json"), "--overwrite"],
             f"{cache.path / 'manifest.json'} lies inside the cache entry {cache.path}, whose files featurecache "
             "manages; choose a path outside it"),
            (["notes.txt/page.html"], "-o notes.txt/page.html: notes.txt is a file, not a folder; choose another path"),
            (["-"], "-o - would write a file named '-': this command does not write to standard output; give a name "
                    "such as report.html")):
        result = runner.invoke(app, ["report", str(cache.path), "-o", *arguments])
        assert result.exit_code == 2, result.output
        assert stderr_lines(result) == [f"error: {expected}"]
    assert {p: p.read_bytes() for p in sorted(cache.path.rglob("*")) if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--hide-scrollbars"]


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (CI installs it)")
def test_the_page_renders_in_chromium(cache, tmp_path):
    fit_head(cache, FitSpec(head="logistic"))
    result, _ = _build(cache, tmp_path)
    profile = tmp_path / "chromium-profile"
    command = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run([*command, "--dump-dom", result.path.as_uri()], capture_output=True, text=True,
                         timeout=120, env=env, check=True).stdout
    assert 'id="leaderboard"' in dom and "<table" in dom  # as the browser parsed it
    assert 'alt="confusion matrix"' in dom and 'alt="PCA scatter plot"' in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*command, "--window-size=1200,2400", f"--screenshot={shot}", result.path.as_uri()],
                   capture_output=True, timeout=120, env=env, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1200)
    assert len(np.unique(pixels)) > 50  # text and figures, not a blank or error page
