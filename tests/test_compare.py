"""Compare backbones (issue 16): each model extracted once, the same heads on each, one table and report.

Tiny random-weight backbones (a torchvision ResNet18 and timm's ConvNeXt-atto) at 32 px on
a 16-image folder built here. The table's figures are those of fitting each head on each
cache directly; a reused entry says so and shows no cost; bad input costs no extraction.
"""

from __future__ import annotations

import base64
import re
import time

import pytest
from typer.testing import CliRunner

from featurecache import compare_backbones, open_cache
from featurecache.cli import app
from featurecache.errors import BackboneError, HeadError, UsageError
from featurecache.fit.stage import FitSpec, fit_head
from featurecache.report.comparison import build_comparison_page, plotted_points
from helpers import write_photo_folder, stderr_lines

pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODELS = ["resnet18", "timm:convnext_atto"]
HEADS = ["logistic", "knn"]
# The CLI's defaults but workers (in-process) and precision (fp32 everywhere): the CLI reuses these entries.
SETTINGS = dict(weights="random", image_size=32, precision="fp32", workers=0, batch_size=8)
CLI = ["--weights", "random", "--image-size", "32", "--precision", "fp32", "--workers", "0", "--batch-size", "8"]
runner = CliRunner()


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One fresh comparison: (comparison, its wall-clock seconds, the photo folder, the cache root)."""
    base = tmp_path_factory.mktemp("compare")
    write_photo_folder(base / "photos")
    started = time.perf_counter()
    comparison = compare_backbones(str(base / "photos"), MODELS, HEADS, root=base / "cache", **SETTINGS)
    return comparison, time.perf_counter() - started, base / "photos", base / "cache"


def test_each_figure_is_the_one_fitting_the_head_on_that_cache_gives(compared):
    comparison, _, _, _ = compared
    assert [run.model for run in comparison.backbones] == MODELS
    assert comparison.heads == ["compare-logistic", "compare-knn"]
    for run in comparison.backbones:
        cache = open_cache(run.entry)
        assert cache.manifest["config"]["arch"] == run.model and run.feature_dim == cache.tap_shapes["pool"][0]
        assert run.images == 16 and run.weights == "random(seed=0)" and run.precision == "fp32"
        assert [score.head for score in run.heads] == HEADS
        for score in run.heads:
            direct = fit_head(cache, FitSpec(head=score.head, name=f"direct-{score.head}")).record
            assert score.error is None
            assert score.chosen_on == direct["selection_split"] == "val"
            assert score.chosen_top1 == direct["metrics"]["val"]["top1"]
            assert (score.reported_on, score.top1) == (direct["headline"]["split"], direct["headline"]["top1"])
            assert "optimistic" in score.note  # no test split: chosen and reported on val, and said so
    assert {run.feature_dim for run in comparison.backbones} == {512, 320}
    rows = {(row[0], row[1]): row for row in comparison.head_rows()}
    assert len(rows) == 4 and all(len(row) == len(comparison.HEAD_COLUMNS) for row in rows.values())
    for run in comparison.backbones:
        for score in run.heads:
            row = rows[(run.model, score.name)]
            assert row[2:6] == ["val", f"{100 * score.chosen_top1:.1f}", "val (optimistic)", f"{100 * score.top1:.1f}"]


def test_extraction_seconds_are_the_time_it_took(compared):
    comparison, wall, _, _ = compared
    seconds = [run.seconds for run in comparison.backbones]
    assert all(s > 0 for s in seconds) and sum(seconds) <= wall  # measured inside the call, not invented
    for run in comparison.backbones:
        assert not run.reused and run.computed == run.images == 16 and run.device == "cpu"
        assert run.seconds_per_image == pytest.approx(run.seconds / 16)
        assert run.images_per_second == pytest.approx(16 / run.seconds)
    rows = comparison.backbone_rows()
    assert [row[:5] for row in rows] == [["resnet18", "32", "512", "16", "16"], ["timm:convnext_atto", "32", "320", "16", "16"]]
    for run, row in zip(comparison.backbones, rows):
        assert row[5:] == [f"{run.seconds:.1f}", f"{run.seconds / 16:.4f}", f"{16 / run.seconds:.1f}", "cpu", "fp32"]


def test_a_second_compare_reuses_the_entries_and_says_so(compared):
    first, _, photos, root = compared
    again = compare_backbones(str(photos), MODELS, HEADS, root=root, **SETTINGS)
    for before, run in zip(first.backbones, again.backbones):
        assert run.entry == before.entry and run.reused and run.computed == 0
        assert run.seconds is None and run.seconds_per_image is None and run.device is None
        assert [s.top1 for s in run.heads] == [s.top1 for s in before.heads]
    assert [row[4:] for row in again.backbone_rows()] == [["reused", "–", "–", "–", "–", "fp32"]] * 2


def test_the_report_holds_the_table_and_an_embedded_plot(compared, tmp_path):
    comparison, _, _, _ = compared
    page = build_comparison_page(comparison, tmp_path / "out" / "compare.html")
    text = page.path.read_text(encoding="utf-8")
    assert "Random weights." in text
    for columns, rows in ((comparison.BACKBONE_COLUMNS, comparison.backbone_rows()),
                          (comparison.HEAD_COLUMNS, comparison.head_rows())):
        assert "".join(f"<th>{name}</th>" for name in columns) in text
        for row in rows:
            cells = "".join(f"<td{' class=n' if columns[i] in comparison.NUMERIC else ''}>{cell}</td>"
                            for i, cell in enumerate(row))
            assert f"<tr>{cells}</tr>" in text
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(embedded) == 1 and page.figures == [tmp_path / "out" / "compare-cost.png"]
    assert base64.b64decode(embedded[0]) == page.figures[0].read_bytes()
    assert page.figures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(embedded[0]) > 5000


def test_reused_backbones_are_left_off_the_plot_and_the_page_says_why(compared, tmp_path):
    _, _, photos, root = compared
    again = compare_backbones(str(photos), MODELS, ["logistic"], root=root, **SETTINGS)
    page = build_comparison_page(again, tmp_path / "compare.html")
    text = page.path.read_text(encoding="utf-8")
    assert page.figures == [] and "data:image/png" not in text
    assert "Nothing to plot: resnet18 (reused: no extraction time recorded); timm:convnext_atto (reused" in text


def test_a_resumed_backbone_is_left_off_the_plot_and_the_page_says_why(compared, tmp_path):
    """An entry finished by this call after an interruption ran only some images: the
    fixed start-up divided over them is no cost per image to set beside whole runs."""
    from dataclasses import replace

    comparison, _, _, _ = compared
    whole, resumed = comparison.backbones
    partial = replace(comparison, backbones=[whole, replace(resumed, computed=4)])
    points, left_off = plotted_points(partial)
    assert {point["backbone"] for point in points} == {whole.model}
    assert left_off == [f"{resumed.model} (resumed: 4 of 16 images computed by this call, so its cost per image "
                        "is not comparable with a whole extraction)"]
    assert partial.backbone_rows()[1][4] == "4 of 16"  # the table still shows what was done


def test_cli_prints_the_table_writes_the_report_and_reports_a_head_that_fails_on_one_backbone(
        compared, tmp_path, monkeypatch):
    """A head that fails on one backbone only (made to, here) is in the table, the page and one
    error line, exit code 1; the other heads and backbones are fitted and shown."""
    import featurecache.fit.stage as stage

    real_fit = stage.fit_head

    def fit_failing_on_convnext(cache, spec):
        if spec.head == "knn" and "convnext" in cache.path.name:
            raise HeadError("k-NN could not be fitted here (made to fail by the test)")
        return real_fit(cache, spec)

    monkeypatch.setattr(stage, "fit_head", fit_failing_on_convnext)
    _, _, photos, root = compared
    output = tmp_path / "report" / "compare.html"
    output.parent.mkdir()
    output.write_text("an earlier page")  # replaced: --overwrite
    result = runner.invoke(app, ["compare", str(photos), "--model", MODELS[0], "--model", MODELS[1], "--head",
                                 "logistic", "--head", "knn", "--root", str(root), "-q", "-o", str(output),
                                 "--overwrite", *CLI])
    assert result.exit_code == 1, result.output
    errors = stderr_lines(result)
    assert errors == ["error: head compare-knn failed on timm:convnext_atto: k-NN could not be fitted here "
                      "(made to fail by the test)"], result.stderr
    assert "Traceback" not in result.output
    assert "no extraction time is recorded" in result.stdout and "random weights: these accuracies" in result.stdout
    assert "failed:" in result.stdout and f"report: {output}" in result.stdout
    page = output.read_text(encoding="utf-8")
    assert "Head <b>compare-knn</b> failed on <b>timm:convnext_atto</b>" in page
    assert ("<tr><td>timm:convnext_atto</td><td>compare-knn</td><td>failed: k-NN could not be fitted here (made to "
            "fail by the test)</td>") in page
    resnet = open_cache(next(run.entry for run in compared[0].backbones if run.model == "resnet18"))
    for head in ("logistic", "knn"):  # the other heads were fitted, and shown
        top1 = real_fit(resnet, FitSpec(head=head, name=f"direct-{head}-2")).record["headline"]["top1"]
        assert f"<tr><td>resnet18</td><td>compare-{head}</td><td>val</td>" in page
        assert f"<td>val (optimistic)</td><td class=n>{100 * top1:.1f}</td>" in page
    assert page.count("<td>compare-logistic</td>") == 2


@pytest.mark.parametrize("models, heads, fragment", [
    (["resnet18"], [], "at least two backbones, got 1"),
    (["resnet18", "RESNET18"], [], "named twice"),
    (["resnet18", "resnet34", "timm:convnext_attoo"], [], "unknown timm model 'convnext_attoo'"),
    (["resnet18", "resnet34", "vgg99"], [], "unknown model 'vgg99'"),
    (["resnet18", "resnet34"], ["logistic", "no-such-head"], "no-such-head"),
    (["resnet18", "timm:convnext_atto"], ["--tap", "layer4"], "unknown tap"),  # a ResNet tap ConvNeXt lacks
    (["resnet18", "resnet34"], ["logistic", "logistic"], "name each head type once"),
    (["resnet18", "resnet34"], ["-o", "."], "is a folder"),  # the report's path, checked before the work
])
def test_bad_input_is_one_line_exit_2_before_any_extraction(models, heads, fragment, tmp_path):
    root = tmp_path / "cache"
    arguments = [a for m in models for a in ("--model", m)]
    options = heads[:1] in (["--tap"], ["-o"])
    arguments += heads if options else [a for h in heads for a in ("--head", h)]
    output = str(tmp_path / "c.html") if heads[:1] != ["-o"] else str(tmp_path)
    result = runner.invoke(app, ["compare", "/no/such/photos" if not heads else str(tmp_path), *arguments,
                                 "--root", str(root), *CLI, "-o", output])
    assert result.exit_code == 2, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert not root.exists() and not (tmp_path / "c.html").exists()


def test_an_output_it_would_break_is_refused_before_any_extraction(compared, tmp_path, monkeypatch):
    """-o (default compare.html) replaced an existing page or PNG silently (a reviewer's find); a
    path in a cache entry (even with --overwrite), under a file, or '-' is refused too."""
    entry = compared[0].backbones[0].entry
    before = {p: p.read_bytes() for p in sorted(entry.rglob("*")) if p.is_file()}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "compare.html").write_text("mine")
    (tmp_path / "mine-cost.png").write_bytes(b"mine too")
    root = tmp_path / "cache"
    for arguments, expected in (
            ([], "-o compare.html exists; pass --overwrite to replace it, or choose another name"),
            (["-o", "mine.html"], "-o mine.html: mine-cost.png exists (the page's figures go next to it); pass "
                                  "--overwrite to replace it, or choose another name"),
            (["-o", str(entry / "compare.html"), "--overwrite"], f"{entry / 'compare.html'} lies inside the cache "
                                                                f"entry {entry}, whose files featurecache manages; "
                                                                "choose a path outside it"),
            (["-o", "compare.html/page.html"], "-o compare.html/page.html: compare.html is a file, not a folder; "
                                               "choose another path"),
            (["-o", "-"], "-o - would write a file named '-': this command does not write to standard output; give "
                          "a name such as compare.html")):
        result = runner.invoke(app, ["compare", str(compared[2]), "--model", "resnet18", "--model", "resnet34",
                                     "--root", str(root), *CLI, *arguments])
        assert result.exit_code == 2, result.output
        assert stderr_lines(result) == [f"error: {expected}"]
    assert not root.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["compare.html", "mine-cost.png"]
    assert (tmp_path / "compare.html").read_text() == "mine"
    assert (tmp_path / "mine-cost.png").read_bytes() == b"mine too"
    assert {p: p.read_bytes() for p in sorted(entry.rglob("*")) if p.is_file()} == before


def test_missing_pretrained_weights_of_a_later_model_stop_the_run_before_the_first(image_folder, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty hub cache: no timm weights
    root = tmp_path / "cache"
    result = runner.invoke(app, ["compare", str(image_folder), "--model", "resnet18", "--model", "timm:convnext_atto",
                                 "--root", str(root), "--workers", "0", "--image-size", "32"])
    assert result.exit_code == 2, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1 and "timm:convnext_atto pretrained weights are not on this machine" in lines[0]
    assert not root.exists()


def test_the_library_checks_every_model_before_the_first_extraction(image_folder, tmp_path):
    root = tmp_path / "cache"
    with pytest.raises(BackboneError, match="unknown model 'vgg99'"):
        compare_backbones(str(image_folder), ["resnet18", "resnet34", "vgg99"], root=root, **SETTINGS)
    with pytest.raises(UsageError, match="at least two backbones"):
        compare_backbones(str(image_folder), "resnet18", root=root, **SETTINGS)
    assert not root.exists()
