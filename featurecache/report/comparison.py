"""The HTML page of a backbone comparison (`featurecache compare`): its table and one plot.

Drawn with the report's own pieces (page style, tables, embedded figures, plots), so it
reads like `featurecache report`: self-contained, no JavaScript, the PNG written next to
the page. It takes a `featurecache.pipeline.compare.Comparison`, read through its
attributes only (the report layer sits below the pipeline layer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from .page import _e, _figure, _table, prepare_page_output, write_page

#: The page's one figure: `<stem>-cost.png` next to it.
FIGURES = ("cost",)

@dataclass
class ComparisonPage:
    path: Path
    figures: list[Path] = field(default_factory=list)


def plotted_points(comparison) -> tuple[list[dict], list[str]]:
    """The (backbone, head) points with a measured cost and a top-1, and the backbones left off and why."""
    points, left_off = [], []
    for run in comparison.backbones:
        if run.seconds_per_image is None:
            left_off.append(f"{run.model} (reused: no extraction time recorded)")
            continue
        if run.computed != run.images:  # a resumed entry: the fixed start-up spread over a few images
            left_off.append(f"{run.model} (resumed: {run.computed} of {run.images} images computed by this call, "
                            "so its cost per image is not comparable with a whole extraction)")
            continue
        for score in run.heads:
            if score.top1 is not None:
                points.append({"backbone": run.model, "head": score.name, "top1": score.top1,
                               "seconds_per_image": run.seconds_per_image})
    return points, left_off


def _table_of(comparison, columns: tuple[str, ...], rows: list[list[str]]) -> str:
    return _table(list(columns), rows, {i for i, name in enumerate(columns) if name in comparison.NUMERIC})


def check_output(output: str | Path, *, overwrite: bool = False) -> Path:
    """Check the page's path (an existing page or PNG is replaced only with `overwrite`) and make
    its folder: call it before the comparison runs."""
    output = Path(output)
    prepare_page_output(output, "the comparison report's folder", "compare.html", FIGURES, overwrite=overwrite)
    return output


def build_comparison_page(comparison, output: str | Path, *, overwrite: bool = False) -> ComparisonPage:
    """Write the page (and its PNG) for `comparison`: its backbone and head tables and the cost plot."""
    from . import plots

    output = check_output(output, overwrite=overwrite)
    page = ComparisonPage(output)
    sections = []
    if comparison.random_weights:
        sections.append("<p class=warn><b>Random weights.</b> These backbones were not pretrained: the "
                        "accuracies are random-feature baselines and say nothing about the backbones' real "
                        "quality; the costs are real.</p>")
    sections.append("<h2 id=backbones>Backbones</h2>" + _table_of(comparison, comparison.BACKBONE_COLUMNS,
                                                                 comparison.backbone_rows()))
    sections.append("<p class=note><i>seconds</i>: wall-clock time of the extract call that computed the features "
                    "(building the network, decoding the images, the forward pass); <i>s/image</i> divides it by the "
                    "images computed. A reused cache entry has no extraction time recorded, so it shows no cost; an entry "
                    "this call only finished (after an interruption) is left off the plot.</p>")
    sections.append("<h2 id=heads>Heads</h2>" + _table_of(comparison, comparison.HEAD_COLUMNS, comparison.head_rows()))
    sections.append("<p class=note>Each head's settings were chosen on the split under <i>chosen on</i>; "
                    "<i>top-1 %</i> is on the split under <i>reported on</i>, marked optimistic when it is the same "
                    "split.</p>")
    for model, score in comparison.failures:
        sections.append(f"<p class=warn>Head <b>{_e(score.name)}</b> failed on <b>{_e(model)}</b>: "
                        f"{_e(score.error)}</p>")
    points, left_off = plotted_points(comparison)
    figures = {}
    sections.append("<h2 id=cost>Accuracy against extraction cost</h2>")
    if points:
        title = "top-1 against extraction cost" + (" (random weights)" if comparison.random_weights else "")
        figures["cost"] = plots.cost_accuracy(points, title)
        caption = "One point per backbone and head; further left is cheaper, higher is more accurate."
        if left_off:
            caption += " Not plotted: " + "; ".join(left_off) + "."
        sections.append(_figure(figures["cost"], caption, "accuracy against extraction cost"))
    else:
        sections.append("<p class=note>Nothing to plot: " + _e("; ".join(left_off) or "no head was fitted")
                        + ". Extract into an empty --root to measure the cost.</p>")
    sections.append("<h2 id=entries>Cache entries</h2>" + _table(
        ["backbone", "entry", "weights"], [[run.model, str(run.entry), run.weights] for run in comparison.backbones]))

    title = f"{comparison.source} · {len(comparison.backbones)} backbones · weights {comparison.weights}"
    page.figures = write_page(
        output, heading="featurecache compare", title=title, what="comparison report", sections=sections,
        figures=figures, figure_names=FIGURES,
        subtitle=f"{_e(title)} · tap <code>{_e(comparison.tap)}</code> · featurecache {_e(__version__)} on "
                 f"{_e(time.strftime('%Y-%m-%d %H:%M'))}")
    return page
