"""`featurecache report`: one self-contained HTML page about a cache entry, plus PNGs.

The page holds the dataset summary (classes, rows per split, skipped files and why),
the leaderboard of heads, ensembles and finetune runs, the chosen head's confusion
matrix and per-class accuracy, learning curves of MLP and finetune runs, a 2-D PCA of
the features coloured by class, thumbnails of the worst mistakes and the cache's
provenance. Figures are embedded as data URIs, so the page reads anywhere, without
JavaScript; each is also written as a PNG next to the page.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__

from . import plots
from ..errors import CorruptCacheError, FeatureCacheError, UsageError
from ..fit.stage import leaderboard
from ..cache.schema import CROSS_ENSEMBLE
from ..fit.cross_ensemble import cross_split_probabilities
from ..fit.headstore import cross_member_changes, list_heads, load_head, read_record
from ..cache.atomic import remove_stale_temporaries, write_bytes_atomic
from ..cache.integrity import output_parents, prepare_output_file, read_sealed_json
from ..cache.layout import FINETUNE_DIR, FINETUNE_RECORD, HEAD_FILE, HEADS_DIR, REPORT_DIR, REPORT_FILE
from ..cache.store import Cache, open_cache
from ..cache.coverage import untaught_classes_of
from ..data.copies import copy_warnings

log = logging.getLogger("featurecache")

INPUTS_META = "featurecache-report-inputs"
#: Every figure a report can have: `<stem>-<name>.png` next to the page.
REPORT_FIGURES = ("confusion", "per-class", "curves", "pca", "tsne")


@dataclass(frozen=True, kw_only=True)
class ReportSpec:
    """What `build_report` needs."""

    output: str | None = None  # the HTML file; default <entry>/report/report.html
    head: str | None = None  # head for the confusion matrix and mistakes; default: the leaderboard's best
    max_points: int = 2000  # rows sampled for the 2-D projection
    worst: int = 16  # thumbnails of the most confident mistakes
    tsne: bool = False  # add a t-SNE projection next to the PCA (slower)
    seed: int = 0
    overwrite: bool = False  # replace an existing `output` and its PNGs (the default output is always rewritten)


@dataclass
class ReportResult:
    path: Path  # the HTML page
    figures: list[Path] = field(default_factory=list)
    head: str | None = None  # the head the page details
    notes: list[str] = field(default_factory=list)  # sections that could not be drawn, and why


def default_output(cache: Cache) -> Path:
    return cache.path / REPORT_DIR / REPORT_FILE


def finetune_records(cache: Cache) -> list[dict]:
    records = []
    for path in sorted((cache.path / FINETUNE_DIR).glob(f"*/{FINETUNE_RECORD}")):
        try:
            records.append(read_sealed_json(path, "finetune record", "run featurecache verify"))
        except (OSError, FeatureCacheError) as error:
            log.warning("skipping %s (%s)", path, error)
    return records


def report_inputs(cache: Cache, spec: ReportSpec) -> str:
    """A hash of everything the page shows: same hash, same page (the pipeline skips the step)."""
    shown = {**asdict(spec), "output": None}
    del shown["overwrite"]  # where the page goes, and whether it may replace a file, do not change it
    parts = [cache.key, __version__, json.dumps(shown, sort_keys=True)]
    for pattern in (f"{HEADS_DIR}/*/{HEAD_FILE}", f"{FINETUNE_DIR}/*/{FINETUNE_RECORD}"):
        for path in sorted(cache.path.glob(pattern)):
            stat = path.stat()
            parts.append(f"{path.relative_to(cache.path)}:{stat.st_size}:{stat.st_mtime_ns}")
    for name in list_heads(cache):  # an ensemble across entries turns stale through the other entries
        try:
            record = read_record(cache, name)
        except CorruptCacheError:  # the leaderboard marks it damaged; its file's stat above is its input
            continue
        if record["head"] == CROSS_ENSEMBLE:
            parts.append(f"{name}:{cross_member_changes(cache, record)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _page_start(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read(4096)
    except (OSError, UnicodeDecodeError):
        return ""


def is_current(path: Path, inputs: str) -> bool:
    """True when the page at `path` was built from the same inputs."""
    return f'name="{INPUTS_META}" content="{inputs}"' in _page_start(path)


def is_report_page(path: Path) -> bool:
    """True when `path` is a report page featurecache wrote."""
    return f'name="{INPUTS_META}" content="' in _page_start(path)


def figure_path(output: Path, name: str) -> Path:
    return output.with_name(f"{output.stem}-{name}.png")


def prepare_page_output(output: Path, what: str, example: str, figure_names: tuple[str, ...], *,
                        overwrite: bool, entry_file: bool = False) -> None:
    """prepare_output_file's checks for a page, whose PNGs next to it are replaced only with `overwrite` too."""
    prepare_output_file(output, what, example, overwrite=overwrite, entry_file=entry_file)
    taken = None if overwrite else next((path for path in (figure_path(output, name) for name in figure_names)
                                         if path.exists()), None)
    if taken is not None:
        raise UsageError(f"-o {output}: {taken} exists (the page's figures go next to it); pass --overwrite to "
                         "replace it, or choose another name")


# ---------------------------------------------------------------- data gathering

def _class_counts(cache: Cache) -> dict[str, list[int]]:
    return {split: np.bincount(cache.labels(split), minlength=len(cache.classes)).tolist()
            for split in cache.labeled_splits}


def _chosen_head(cache: Cache, board: list[dict], name: str | None) -> str | None:
    if name is not None:
        read_record(cache, name)  # raises a clear error for an unknown head
        return name
    fresh = [row["name"] for row in board if not row["stale"]]
    return fresh[0] if fresh else None


def _projection_split(cache: Cache) -> str:
    labeled = cache.labeled_splits  # an unlabelled split has no classes to colour or mistakes to show
    return next(s for s in ("test", "val", "train", *labeled) if labeled.get(s))


def _projection(cache: Cache, spec: ReportSpec, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, str]]:
    features = cache.features(split, "pool" if "pool" in cache.taps else cache.taps[0])
    features = features.reshape(len(features), -1).astype(np.float64)
    labels = cache.labels(split)
    if len(features) > spec.max_points:
        keep = np.sort(np.random.default_rng(spec.seed).choice(len(features), spec.max_points, replace=False))
        features, labels = features[keep], labels[keep]
    centred = features - features.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    share = singular**2 / max((singular**2).sum(), 1e-12)
    points = centred @ components[:2].T
    if points.shape[1] < 2:
        points = np.column_stack([points, np.zeros(len(points))])
    labels_text = tuple(f"PC {i + 1} ({100 * share[i]:.0f}% of variance)" if i < len(share) else f"PC {i + 1}"
                        for i in range(2))
    return points, labels, labels_text


def _tsne(cache: Cache, spec: ReportSpec, split: str) -> np.ndarray | None:
    from sklearn.manifold import TSNE

    features = cache.features(split, "pool").reshape(cache.splits[split], -1).astype(np.float32)
    if len(features) > spec.max_points:
        keep = np.sort(np.random.default_rng(spec.seed).choice(len(features), spec.max_points, replace=False))
        features = features[keep]
    if len(features) < 5:
        return None
    return TSNE(n_components=2, init="pca", random_state=spec.seed,
                perplexity=min(30.0, (len(features) - 1) / 3)).fit_transform(features)


def _mistakes(cache: Cache, head_name: str, split: str, count: int) -> tuple[list[dict], str | None]:
    """The most confident wrong predictions on `split`, with thumbnails where the images are readable."""
    if read_record(cache, head_name)["head"] == CROSS_ENSEMBLE:  # the rows every member's entry holds
        voted = cross_split_probabilities(cache, head_name, split)
        probabilities, labels, paths = voted.probabilities, voted.labels, voted.paths
    else:
        head, record = load_head(cache, head_name)
        features = cache.features(split, record["tap"])
        probabilities = head.predict_proba(features.reshape(len(features), -1))
        labels, paths = cache.labels(split), cache.paths(split)
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:count]
    rows = [{"path": paths[i], "true": cache.classes[labels[i]], "predicted": cache.classes[predicted[i]],
             "probability": float(probabilities[i, predicted[i]]), "image": None} for i in wrong]
    if not rows:
        return rows, None
    try:
        from ..data.sources import reopen_source

        source = reopen_source(cache.manifest["spec"])
        by_path = {sample.path: sample for sample in source.samples}
        for row in rows:
            if row["path"] in by_path:
                row["image"] = plots.thumbnail(source.load(by_path[row["path"]]))
    except (FeatureCacheError, OSError) as error:
        return rows, f"thumbnails unavailable: the source cannot be read now ({error})"
    return rows, None


# ---------------------------------------------------------------- HTML

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1f2933;
background:#f6f7f9;margin:0}
main{max-width:1120px;margin:0 auto;padding:28px 32px 48px;background:#fff;box-shadow:0 0 0 1px #e4e7eb}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 10px;padding-bottom:4px;border-bottom:2px solid #e4e7eb}
.sub{color:#52606d;margin:0 0 18px}.note{color:#52606d;font-size:14px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{flex:0 1 150px;background:#f0f4f8;border-radius:8px;padding:10px 14px}
.card b{display:block;font-size:22px}.card span{color:#52606d;font-size:13px}
table{border-collapse:collapse;font-size:14px;margin:8px 0}th,td{padding:5px 10px;text-align:left;
border-bottom:1px solid #e4e7eb;vertical-align:top}th{background:#f0f4f8;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}tr.best td{background:#e3f8e9;font-weight:600}
.figs{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}figure{margin:0}
figure img{max-width:100%;height:auto;border:1px solid #e4e7eb;border-radius:4px}
figcaption{font-size:13px;color:#52606d}
.thumbs{display:grid;grid-template-columns:repeat(auto-fill,minmax(120px,1fr));gap:12px}
.thumbs figure{text-align:center;font-size:13px}.thumbs img{width:96px;height:96px;object-fit:contain;
image-rendering:pixelated;background:#fafafa}
.warn{background:#fff8e1;border-left:4px solid #f0b429;padding:8px 12px}
code{font-size:13px;background:#f0f4f8;padding:1px 4px;border-radius:3px;word-break:break-all}
"""


def _e(value) -> str:
    return html.escape(str(value))


def _compact(chosen) -> str:
    """Chosen hyper-parameters, numbers to 3 significant digits: {"C": 1873.8...} -> C=1.87e+03."""
    if not chosen:
        return "–"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in chosen.items())


def _blocks(names: list[str]) -> str:
    """["layer4.0", "layer4.1", "layer4.2"] -> "layer4 (3 blocks)"."""
    stages = dict.fromkeys(name.split(".")[0] for name in names)
    return f"{' + '.join(stages)} ({len(names)} blocks)" if names else "–"


def _finetune_row(run: dict, warning: str | None) -> list:
    """A finetune run's row; an unfinished one (stopped, or running) says so where its numbers are."""
    done = run.get("epochs_done", "–")
    return [run["name"] + (" (unfinished)" if warning else ""), run.get("starting_head", "–"),
            _blocks(run.get("trainable_blocks", [])), run.get("path", "–"),
            f"{done} of {(run.get('spec') or {}).get('epochs')}" if warning else done,
            _pct(run.get("history", [{}])[0].get("val_top1")), _pct(run.get("best_val_top1"))
            + (" so far" if warning else ""), _pct((run.get("test_metrics") or {}).get("top1")),
            "no (resumable)" if warning else "yes"]


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset(), best: int | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        f'<tr{" class=best" if index == best else ""}>'
        + "".join(f'<td{" class=n" if column in numeric else ""}>{_e(cell)}</td>' for column, cell in enumerate(row))
        + "</tr>" for index, row in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(png: bytes, caption: str, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}"><figcaption>{_e(caption)}</figcaption></figure>'


def build_report(cache: Cache | str | Path, spec: ReportSpec = ReportSpec()) -> ReportResult:
    """Write the HTML page and its PNGs; returns where they are."""
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    if spec.max_points < 10 or spec.worst < 0:
        raise UsageError("--max-points must be at least 10 and --worst at least 0")
    output = Path(spec.output) if spec.output else default_output(cache)
    own = not spec.output  # the entry's own report, rewritten each time
    prepare_page_output(output, "the report folder", REPORT_FILE, REPORT_FIGURES, overwrite=spec.overwrite or own,
                        entry_file=own)
    result = ReportResult(output)
    manifest, config = cache.manifest, cache.manifest["config"]
    board, runs = leaderboard(cache), finetune_records(cache)
    result.head = _chosen_head(cache, board, spec.head)
    result.notes += [f"head {r['name']} is damaged and left out of the page: {r['damaged']}" for r in board if r["damaged"]]
    figures: dict[str, bytes] = {}
    sections: list[str] = []

    if manifest["weights"]["description"].startswith("random"):
        sections.append("<p class=warn><b>Random weights.</b> This backbone was not pretrained, so these "
                        "figures are a random-feature baseline; with ImageNet weights expect far better ones.</p>")
    data_warnings = untaught_classes_of(cache) + copy_warnings(manifest.get("copies") or [])
    if data_warnings:  # the figures below are read in their light
        sections.append("<div class=warn><b>Before reading the figures:</b><ul>"
                        + "".join(f"<li>{_e(w)}</li>" for w in data_warnings) + "</ul></div>")
    # The dataset
    counts = _class_counts(cache)
    splits = list(counts)
    skipped = manifest.get("skipped", [])
    unlabeled = [s for s in cache.unlabeled_splits if s in cache.splits]
    cards = [(len(cache.classes), "classes"), *((cache.splits[s], f"{s} images") for s in splits),
             *((cache.splits[s], f"{s} images, unlabelled") for s in unlabeled),
             (len(skipped), "skipped files"), (len(board), "heads"), (len(runs), "finetune runs")]
    sections.append('<div class=cards>' + "".join(f"<div class=card><b>{_e(v)}</b><span>{_e(k)}</span></div>"
                                                 for v, k in cards) + "</div>")
    class_rows = [[name, *(counts[s][i] for s in splits), sum(counts[s][i] for s in splits)]
                  for i, name in enumerate(cache.classes)]
    class_rows.append(["all", *(cache.splits[s] for s in splits), sum(cache.splits[s] for s in splits)])
    sections.append("<h2 id=dataset>Dataset</h2>" + _table(["class", *splits, "total"], class_rows,
                                                            set(range(1, len(splits) + 2))))
    if unlabeled:
        sections.append("<p class=note>Unlabelled, cached to predict on and never scored: "
                        + ", ".join(f"{_e(s)} {cache.splits[s]} images" for s in unlabeled)
                        + f" (<code>featurecache predict {_e(cache.path.name)} --split {_e(unlabeled[0])} "
                        "--head NAME</code>).</p>")
    if skipped:
        sections.append(f"<p>{len(skipped)} files could not be read and were left out:</p>"
                        + _table(["file", "reason"], [[s["path"], s["reason"]] for s in skipped[:50]])
                        + (f"<p class=note>… and {len(skipped) - 50} more (see manifest.json)</p>" if len(skipped) > 50 else ""))
    else:
        sections.append("<p class=note>Every file was read; none was skipped.</p>")

    # The leaderboard
    sections.append("<h2 id=leaderboard>Leaderboard</h2>")
    if board:
        rows = [[r["name"] + (" (damaged)" if r["damaged"] else " (stale)" if r["stale"] else ""), r["head"], r["tap"],
                 r["split"], _pct(r["top1"]), _pct(r["top5"]), _pct(r["val_top1"]),
                 "–" if r["fit_seconds"] is None else f"{r['fit_seconds']:.1f}", _compact(r["chosen"]), r["views"]]
                for r in board]
        best = next((i for i, r in enumerate(board) if r["name"] == result.head), None)
        sections.append(_table(["head", "type", "tap", "reported on", "top-1 %", "top-5 %", "val top-1 %", "fit s",
                                "chosen on validation", "trained on views"], rows, {4, 5, 6, 7}, best))
        sections.append(f"<p class=note>Best first. Hyper-parameters are chosen on validation; "
                        f"{_e(board[0]['note'])}.</p>")
        sections += [f"<p class=note>{_e(r['name'])} votes across entries: {_e(', '.join(r['entries']))}"
                     + "".join(f"; {n - r['carved_apart'].get(split, 0)} {_e(split)} row(s) not in every entry were "
                               "left out" for split, n in r["left_out"].items() if n - r["carved_apart"].get(split, 0))
                     + "".join(f"; {n} {_e(split)} row(s) carved into training by another member's entry (their "
                               "train splits hold other files) were left out" for split, n in r["carved_apart"].items())
                     + ".</p>" for r in board if r["entries"]]
        sections += [f"<p class=warn>{_e(r['name'])} is damaged and left out: {_e(r['damaged'])}</p>"
                     for r in board if r["damaged"]]
    else:
        sections.append(f"<p>No head fitted yet. Fit one with <code>featurecache fit-head {_e(cache.path.name)} "
                        "--head logistic</code> and build the report again.</p>")
    if runs:
        from ..finetune.runs import unfinished

        warnings = [unfinished(cache, r) for r in runs]  # None for a finished run
        sections.append("<h3>Finetune runs</h3>" + _table(
            ["run", "from head", "unfrozen", "trained on", "epochs", "val top-1 % before", "best val top-1 %",
             "test top-1 %", "complete"], [_finetune_row(r, w) for r, w in zip(runs, warnings)], {4, 5, 6, 7}))
        sections += [f"<p class=warn>{_e(warning)}; until then its numbers are those of its best epoch so far, "
                     "not a result.</p>" for warning in warnings if warning]

    # The chosen head
    sections.append("<h2 id=head>Where the best head goes wrong</h2>")
    if result.head:
        record = read_record(cache, result.head)
        split = record["headline"]["split"]
        metrics = record["metrics"][split]
        sections.append(f"<p>Head <b>{_e(result.head)}</b> ({_e(record['head'])}) on the {_e(split)} split: "
                        f"top-1 {_pct(metrics['top1'])}% over {metrics['n']} images.</p>")
        figures["confusion"] = plots.confusion_heatmap(np.asarray(metrics["confusion_matrix"]), cache.classes,
                                                       f"confusion matrix: {result.head}, {split}")
        figures["per-class"] = plots.per_class_bars(metrics["per_class_accuracy"], f"per-class accuracy, {split}")
        n_classes = len(cache.classes)
        confusion_caption = ("Rows: true class; columns: predicted. Colour: share of the row"
                             + ("; numbers: counts." if n_classes <= 20 else "."))
        per_class_caption = "Lowest accuracy at the top."
        if n_classes > plots.MAX_LABELLED_CLASSES:
            confusion_caption += (f" Only the {plots.CONFUSED_CLASSES} classes involved in the most mistakes are "
                                  f"drawn, of {n_classes}.")
            per_class_caption += f" Only the {plots.MAX_LABELLED_CLASSES} lowest of {n_classes} classes are drawn."
        sections.append('<div class=figs>' + _figure(figures["confusion"], confusion_caption, "confusion matrix")
                        + _figure(figures["per-class"], per_class_caption, "per-class accuracy") + "</div>")
        pairs = plots.confused_pairs(np.asarray(metrics["confusion_matrix"]), cache.classes)
        if pairs:
            sections.append("<h3>The most frequent mistakes</h3>" + _table(
                ["true class", "predicted as", "images", "% of the true class"],
                [[true, predicted, count, f"{100 * share:.1f}"] for true, predicted, count, share in pairs], {2, 3}))
        cache_split = split if split in cache.labeled_splits else _projection_split(cache)
        try:
            mistakes, why = _mistakes(cache, result.head, cache_split, spec.worst) if spec.worst else ([], None)
        except CorruptCacheError as error:  # its tensors (the record above is sound): the rest of the page stands
            result.notes.append(f"the mistakes of head {result.head} are left out of the page: {error}")
            mistakes, why = None, result.notes[-1]
        if mistakes:
            sections.append(f"<h3>The {len(mistakes)} most confident mistakes ({_e(cache_split)})</h3><div class=thumbs>"
                            + "".join(_thumb(m) for m in mistakes) + "</div>")
        elif spec.worst and mistakes is not None:
            sections.append(f"<p class=note>No mistakes on {_e(cache_split)}.</p>")
        if why:
            sections.append(f"<p class=note>{_e(why)}</p>")
    else:
        sections.append("<p>No head yet, so no confusion matrix or mistakes to show.</p>")

    # Learning curves
    sections.append("<h2 id=curves>Learning curves</h2>")
    curves = [{"label": f"mlp {name}", "history": read_record(cache, name)["config"].get("history_") or []}
              for name in (r["name"] for r in board if r["head"] == "mlp")]
    curves += [{"label": f"finetune {r['name']}" + ("" if r.get("complete") else " (unfinished)"),
                "history": r.get("history", [])} for r in runs]
    curves = [c for c in curves if c["history"]]
    if curves:
        figures["curves"] = plots.learning_curves(curves)
        sections.append(_figure(figures["curves"], "MLP heads: the best setting of the sweep. Finetune runs: "
                                "epoch 0 is the starting head on the unchanged backbone.", "learning curves"))
    else:
        sections.append("<p class=note>No MLP head or finetune run yet.</p>")

    # The features in 2-D
    split = _projection_split(cache)
    points, labels, axis_labels = _projection(cache, spec, split)
    sections.append("<h2 id=features>The features in two dimensions</h2>")
    figures["pca"] = plots.scatter_2d(points, labels, cache.classes, f"PCA of the {split} features", axis_labels)
    projection = _figure(figures["pca"], f"{len(points)} {split} images; well-separated colours mean a linear head "
                         "has an easy job.", "PCA scatter plot")
    if spec.tsne:
        embedded = _tsne(cache, spec, split)
        if embedded is not None:
            figures["tsne"] = plots.scatter_2d(embedded, labels, cache.classes, f"t-SNE of the {split} features")
            projection += _figure(figures["tsne"], "t-SNE keeps neighbours, not distances.", "t-SNE scatter plot")
    sections.append(f"<div class=figs>{projection}</div>")

    # Provenance
    pre = config["preprocessing"]
    provenance = [
        ("entry", cache.path.name), ("key", manifest["key"]), ("source", f"{config['source']['kind']}: {config['source']['root']}"),
        ("backbone", config["arch"]), ("weights", manifest["weights"]["description"]),
        ("weights SHA-256", manifest["weights"]["sha256"]), ("taps", ", ".join(f"{t} {tuple(s)}" for t, s in cache.tap_shapes.items())),
        ("preprocessing", f"resize shorter side to {pre['resize_size']} ({pre['interpolation']}), centre crop "
                          f"{pre['crop_size']}, mean {pre['mean']}, std {pre['std']}"),
        ("storage", f"{manifest['dtype']}; forward pass in {config['precision']}"),
        ("made by", f"featurecache {manifest.get('tool_version', '?')} on {manifest.get('created', '?')}"),
        ("report by", f"featurecache {__version__} on {time.strftime('%Y-%m-%d %H:%M')}"),
    ]
    sections.append("<h2 id=provenance>Provenance</h2><table>" + "".join(
        f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in provenance) + "</table>")

    title = f"{config['source']['name']} · {config['arch']} · {manifest['weights']['description']}"
    result.figures = write_page(
        output, heading="featurecache report", title=title, what="report", sections=sections, figures=figures,
        figure_names=REPORT_FIGURES,
        subtitle=f"{_e(title)} · entry <code>{_e(cache.path.name)}</code>",
        meta=f'<meta name="{INPUTS_META}" content="{report_inputs(cache, spec)}">')
    return result


def write_page(output: Path, *, heading: str, title: str, subtitle: str, sections: list[str],
               figures: dict[str, bytes], figure_names: tuple[str, ...], what: str, meta: str = "") -> list[Path]:
    """Write each figure as `<stem>-<name>.png` next to `output`, then the page; returns the PNGs' paths.

    `subtitle`, `sections` and `meta` are HTML already; `figure_names`: every figure the page
    can have (temporaries a dead writer left of any of them are removed)."""
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8>{meta}"
            f'<meta name=viewport content="width=device-width,initial-scale=1"><title>{_e(heading)}: {_e(title)}'
            f"</title><style>{CSS}</style></head><body><main><h1>{_e(heading)}</h1>"
            f"<p class=sub>{subtitle}</p>" + "".join(sections) + "</main></body></html>\n")
    paths = []
    with output_parents(output, f"the {what}'s folder"):  # made only now that there is a page to write
        remove_stale_temporaries(output.parent, (output.name, *(figure_path(output, name).name
                                                                for name in figure_names)))
        for name, png in figures.items():
            path = figure_path(output, name)
            write_bytes_atomic(path, png, f"the {what} figure")
            paths.append(path)
        write_bytes_atomic(output, page.encode("utf-8"), f"the {what}")
    return paths


def _thumb(mistake: dict) -> str:
    image = (f'<img src="data:image/png;base64,{base64.b64encode(mistake["image"]).decode()}" alt="{_e(mistake["path"])}">'
             if mistake["image"] else "<div class=note>(no image)</div>")
    return (f"<figure>{image}<figcaption>true <b>{_e(mistake['true'])}</b> → {_e(mistake['predicted'])} "
            f"({100 * mistake['probability']:.0f}%)<br><span title=\"{_e(mistake['path'])}\">"
            f"{_e(Path(mistake['path']).name)}</span></figcaption></figure>")
