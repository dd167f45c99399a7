"""CLI commands of the fit-head stage: fit-head, heads, ensemble, predict, export."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .app import app, console, err_console, handle_errors
from ..errors import UsageError


def _parse_params(values: list[str]) -> dict:
    """`key=value` pairs; values are JSON when they parse (numbers, lists), else strings."""
    params = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {item!r} is not key=value (e.g. --param C=0.1 or --param hidden_sizes=[256])")
        if key in params:  # the last would win without a word
            raise UsageError(f"--param {key} is given twice; give each parameter once (a grid: --param {key}=[a,b])")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def _parse_bytes(text: str) -> int:
    """`8G`, `512M`, `100K` or a plain number of bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.strip().upper().rstrip("IB"), ""
    if number and number[-1] in units:
        number, unit = number[:-1], number[-1]
    try:
        value = int(float(number) * units[unit])
    except (ValueError, OverflowError):  # OverflowError: inf, 1e400
        raise UsageError(f"--max-memory {text!r} is not a size; use e.g. 8G, 512M or a number of bytes") from None
    if value <= 0:
        raise UsageError("--max-memory must be positive")
    return value


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _open(cache: str, root: Optional[Path]):
    from ..cache.store import open_cache

    return open_cache(cache, root=root)


@app.command("fit-head")
@handle_errors
def fit_head_command(
    cache: Annotated[str, typer.Argument(help="Cache entry (path, folder name or key prefix).")],
    head: Annotated[str, typer.Option(help="logistic, mlp, knn, or sklearn:<module>.<Estimator> (e.g. sklearn:svm.LinearSVC).")] = "logistic",
    name: Annotated[Optional[str], typer.Option(help="Name under heads/ (default: the head type).")] = None,
    tap: Annotated[str, typer.Option(help="Which cached features to use.")] = "pool",
    param: Annotated[list[str], typer.Option("--param", help="Head parameter key=value, repeatable: C=0.1, Cs=[0.01,1], hidden_sizes=[256], k=10.")] = [],
    val_fraction: Annotated[Optional[float], typer.Option(help="Carve validation from train (stratified) instead of using the val split.")] = None,
    refit: Annotated[bool, typer.Option(help="Retrain the chosen setting on train+val (logistic).")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    max_memory: Annotated[Optional[str], typer.Option(help="Features held in memory at most, e.g. 8G or 512M (default: half the free RAM); above it the logistic, mlp and knn heads stream shards.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing head of the same name.")] = False,
    views: Annotated[Optional[str], typer.Option(help="Train on K cached augmented views per train image (or 'all'): mlp draws one version per image per epoch, logistic stacks them, knn keeps the plain features. val/test stay plain.")] = None,
    view_set: Annotated[Optional[str], typer.Option(help="Which view set, when the entry has several: a policy (crop-flip, flip, crop-flip:0.5-1) or a view key prefix.")] = None,
    view_mode: Annotated[Optional[str], typer.Option(help="logistic/sklearn heads: mean of each image's views (default) or stack them as extra rows.")] = None,
    root: Annotated[Optional[Path], typer.Option(help="Cache root.")] = None,
) -> None:
    """Fit a classifier head on cached features; choose hyper-parameters on validation.

    Example: featurecache fit-head cache/digits-resnet50-0123456789ab --head logistic
    """
    from ..fit.stage import FitSpec, fit_head

    spec = FitSpec(head=head, name=name, tap=tap, params=_parse_params(param), val_fraction=val_fraction,
                   refit=refit, seed=seed, max_memory=_parse_bytes(max_memory) if max_memory else None,
                   overwrite=overwrite, views=_parse_views(views), view_set=view_set, view_mode=view_mode)
    result = fit_head(_open(cache, root), spec)
    record = result.record
    headline = record["headline"]
    chosen = f" (chosen: {json.dumps(record['chosen'])})" if record.get("chosen") else ""
    console.print(f"head {result.name}: {headline['split']} top-1 {_percent(headline['top1'])}%{chosen}",
                  markup=False, highlight=False)
    console.print(f"  {headline['note']}; fitted in {record['fit_seconds']:.1f}s; saved to {result.path}",
                  markup=False, highlight=False)
    for note in record.get("notes") or []:
        err_console.print(f"warning: {note}", markup=False, highlight=False, soft_wrap=True)
    if record.get("views"):
        from ..fit.headstore import views_label

        console.print(f"  trained on views: {views_label(record['views'])}", markup=False, highlight=False)


def _parse_views(text: Optional[str]):
    if text is None or text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--views {text!r} must be a number of views or 'all'") from None


@app.command("heads")
@handle_errors
def heads_command(
    cache: Annotated[str, typer.Argument(help="Cache entry.")],
    root: Annotated[Optional[Path], typer.Option(help="Cache root.")] = None,
) -> None:
    """Leaderboard of every head and ensemble on a cache, best first.

    Example: featurecache heads cache/digits-resnet50-0123456789ab
    """
    from ..fit.headstore import leaderboard

    rows = leaderboard(_open(cache, root))
    if not rows:
        console.print("no heads yet; fit one with featurecache fit-head", markup=False)
        return
    table = Table()
    for column in ("head", "top-1 %", "top-5 %", "val top-1 %", "fit s", "views"):
        table.add_column(column, overflow="fold")
    for row in rows:
        if row["damaged"]:
            table.add_row(f"{row['name']} (damaged)", "-", "-", "-", "-", "-")
            continue
        label = row["name"] + ("" if row["head"] in (row["name"], f"sklearn:{row['name'][8:]}") else f" ({row['head']})")
        label += ("" if row["tap"] == "pool" else f" [{row['tap']}]") + (" (stale)" if row["stale"] else "")
        table.add_row(label, f"{_percent(row['top1'])} {row['split']}", _percent(row["top5"]),
                      _percent(row["val_top1"]), f"{row['fit_seconds']:.1f}", row["views"])
    console.print(table)
    damaged = [row for row in rows if row["damaged"]]
    for row in damaged:
        err_console.print(f"warning: head {row['name']} is damaged: {row['damaged']}", markup=False, highlight=False,
                          soft_wrap=True)
    if damaged:
        raise typer.Exit(1)


@app.command("ensemble")
@handle_errors
def ensemble_command(
    cache: Annotated[str, typer.Argument(help="Cache entry.")],
    members: Annotated[list[str], typer.Argument(help="Fitted heads to combine: HEAD on this entry, or ENTRY:HEAD on another entry of the same source (a sibling folder name or a path), matched by image path.")],
    name: Annotated[str, typer.Option(help="Name of the ensemble head.")] = "ensemble",
    weights: Annotated[Optional[str], typer.Option(help="Comma-separated weights, one per head (default equal).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing head or ensemble of that name (never one of its members).")] = False,
    root: Annotated[Optional[Path], typer.Option(help="Cache root.")] = None,
) -> None:
    """Soft-voting ensemble (weighted average of probabilities) saved as a head.

    Example: featurecache ensemble cache/digits-resnet50-0123456789ab logistic mlp knn --name vote
    Example: featurecache ensemble cache/pets-resnet50-0123456789ab logistic pets-timm-convnext_tiny-0123456789ab:logistic --name vote
    """
    from ..fit.cross_ensemble import parse_member
    from ..fit.stage import make_ensemble

    try:
        parsed = [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        raise UsageError(f"--weights {weights!r} must be comma-separated numbers") from None
    result = make_ensemble(_open(cache, root), [parse_member(m) for m in members], name=name, weights=parsed,
                           overwrite=overwrite)
    headline = result.record["headline"]
    console.print(f"ensemble {result.name} of {', '.join(members)}: {headline['split']} top-1 "
                  f"{_percent(headline['top1'])}% ({headline['note']})", markup=False, highlight=False)
    for split, part in (result.record.get("alignment") or {}).items():
        carved = part.get("carved_into_training", 0)
        if part["left_out"] - carved:
            console.print(f"  warning: {part['left_out'] - carved} {split} row(s) are not in every member's entry and "
                          f"were left out; scored on the {part['rows']} rows all hold", markup=False, highlight=False)
        if carved:
            console.print(f"  warning: {carved} {split} row(s) were carved into training by another member's entry "
                          "(the entries' train splits hold other files, so the same --val-fraction and --seed carve "
                          f"other rows) and were left out; scored on the {part['rows']} rows every member held out",
                          markup=False, highlight=False)


def _predictor(cache: str, head: Optional[str], finetune: Optional[str], root: Optional[Path],
               warnings: Optional[list[str]] = None):
    """The predictor of a head or a finetune run. Given `warnings` (predict), an unfinished run is
    used, its warning added; else (export) it is refused: an exported model must be final."""
    if (head is None) == (finetune is None):
        raise UsageError("give exactly one of --head NAME or --finetune NAME")
    if finetune is not None:
        from ..finetune.runs import load_finetune_run

        predictor, warning = load_finetune_run(_open(cache, root), finetune, unfinished_ok=warnings is not None)
        if warning and warnings is not None:
            warnings.append(warning)
        return predictor
    from ..serve.predict import load_predictor

    return load_predictor(_open(cache, root), head)


@app.command("predict")
@handle_errors
def predict_command(
    cache: Annotated[str, typer.Argument(help="Cache entry whose backbone and preprocessing to use.")],
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Image files or folders (or --split instead).")] = None,
    head: Annotated[Optional[str], typer.Option(help="A fitted head on the cache.")] = None,
    finetune: Annotated[Optional[str], typer.Option(help="A finetune run on the cache, instead of --head.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Predict a split the cache holds (e.g. an unlabelled test) from its cached features, without decoding images.")] = None,
    top_k: Annotated[int, typer.Option(min=1)] = 3,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write CSV here instead of a table.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing -o file.")] = False,
    root: Annotated[Optional[Path], typer.Option(help="Cache root.")] = None,
) -> None:
    """Classify new images with the cache's own backbone checkpoint and a head, or a cached split.

    Example: featurecache predict cache/hymenoptera-resnet50-0123456789ab photo.jpg more/ --head logistic
    Example: featurecache predict cache/tinyimagenet-resnet50-0123456789ab --split test --head logistic -o test.csv
    """
    if output is not None:  # before any work: a typo must not replace a file, nor fail after the predictions
        from ..cache.integrity import prepare_output_file

        prepare_output_file(Path(output), "the predictions' folder", "predictions.csv", overwrite=overwrite)
    warnings: list[str] = []
    if split is not None:
        if paths:
            raise UsageError("give image paths or --split, not both")
        if finetune is not None or head is None:
            raise UsageError("--split predicts from the cached features, so it needs --head NAME "
                             "(a finetune run changed the backbone: pass it image paths instead)")
        from ..serve.predict import predict_split

        opened = _open(cache, root)
        results, n_classes = predict_split(opened, head, split, top_k=top_k), len(opened.classes)
    else:
        if not paths:
            raise UsageError("give image files or folders to classify, or --split SPLIT to predict a cached split")
        from ..serve.predict import predict

        predictor = _predictor(cache, head, finetune, root, warnings)
        results, n_classes = predict(predictor, list(paths), top_k=top_k), len(predictor.classes)
    if output is not None:
        from ..cache.atomic import write_atomic
        from ..cache.integrity import output_parents

        columns = min(top_k, n_classes)  # also when no image got a prediction: scripts expect the columns

        def write_csv(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["path"] + [f"{kind}{i + 1}" for i in range(columns) for kind in ("class", "prob")]
                                + ["error"])
                for r in results:
                    cells = [c for cls, p in r.top for c in (cls, f"{p:.6f}")]
                    writer.writerow([r.path] + cells + [""] * (2 * columns - len(cells)) + [r.error])

        with output_parents(Path(output), "the predictions' folder"):  # made only now that there is a result
            write_atomic(Path(output), write_csv, "the predictions")
        console.print(f"wrote {len(results)} predictions to {output}", markup=False, highlight=False)
    else:
        table = Table("path", "prediction", "probability", "runners-up")
        for r in results:
            if r.error:
                table.add_row(r.path, "-", "-", r.error)
            else:
                rest = ", ".join(f"{c} {p:.3f}" for c, p in r.top[1:])
                table.add_row(r.path, r.top[0][0], f"{r.top[0][1]:.3f}", rest)
        console.print(table)
    failed = sum(1 for r in results if r.error)
    if failed:  # a script must not mistake a run with missing predictions for a complete one
        where = "their error column" if output is not None else "the table"
        warnings.append(f"{failed} of {len(results)} have no prediction ({where} says why)")
    for warning in warnings:
        err_console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    if warnings:
        raise typer.Exit(1)


@app.command("export")
@handle_errors
def export_command(
    cache: Annotated[str, typer.Argument(help="Cache entry.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file, e.g. model.pt.")],
    head: Annotated[Optional[str], typer.Option(help="A fitted head on the cache.")] = None,
    finetune: Annotated[Optional[str], typer.Option(help="A finetune run on the cache, instead of --head.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing -o file.")] = False,
    root: Annotated[Optional[Path], typer.Option(help="Cache root.")] = None,
) -> None:
    """Write backbone + head + class names + preprocessing as one TorchScript file.

    Example: featurecache export cache/digits-resnet50-0123456789ab --head logistic -o model.pt
    """
    from ..cache.integrity import prepare_output_file
    from ..serve.export import export_model

    prepare_output_file(Path(output), "the export folder", "model.pt", overwrite=overwrite)  # before loading anything
    predictor = _predictor(cache, head, finetune, root)
    entry = _open(cache, root)
    provenance = {"cache": entry.path.name, "cache_key": entry.key, "head": head, "finetune": finetune}
    if head is not None:  # which fit of the head: its record's checksum (a refit changes it)
        from ..fit.headstore import read_record_with_checksum

        provenance["head_checksum"] = read_record_with_checksum(entry, head)[1]
    path = export_model(predictor, output, provenance=provenance, overwrite=overwrite)
    console.print(f"wrote {path} ({len(predictor.classes)} classes, input {predictor.preprocessing.crop_size}px)",
                  markup=False, highlight=False)
    print("load it with: torch.jit.load(path, _extra_files={'featurecache.json': ''})", file=sys.stderr)


@app.command("export-features")
@handle_errors
def export_features_command(
    cache: Annotated[str, typer.Argument(help="Cache entry.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="A new (or empty) folder to write.")],
    format: Annotated[str, typer.Option("--format", help="npy (one .npy per array and split), parquet (one file per split; needs pyarrow) or hf (a Hugging Face DatasetDict that datasets.load_from_disk opens; needs datasets).")] = "npy",
    tap: Annotated[str, typer.Option(help="Which cached features to write.")] = "pool",
    split: Annotated[list[str], typer.Option("--split", help="Only these splits (repeatable; default all).")] = [],
    root: Annotated[Optional[Path], typer.Option(help="Cache root.")] = None,
) -> None:
    """Write features, labels, paths and splits as .npy files, parquet or a Hugging Face dataset, for other tools.

    Example: featurecache export-features cache/digits-resnet50-0123456789ab --format npy -o digits-features
    """
    from ..serve.export_features import export_features

    path = export_features(_open(cache, root), output, format=format, tap=tap, splits=list(split) or None)
    console.print(f"wrote the {tap} features of {', '.join(split) or 'every split'} to {path} ({format}; "
                  "dataset.json describes them)", markup=False, highlight=False)
