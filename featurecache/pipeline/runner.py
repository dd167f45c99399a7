"""Declarative pipelines: extract -> heads -> ensemble -> finetune -> report from one TOML file.

Each table of the file maps onto a stage's frozen spec (`[extract]` -> ExtractSpec,
`[[heads]]` -> FitSpec, `[ensemble]` -> EnsembleStep, `[finetune]` -> FinetuneSpec,
`[report]` -> ReportSpec), so a pipeline accepts exactly the settings the stages do.
Errors name the file, the line and the field. Relative paths in the file are relative
to the file's folder. Every step whose result is already on disk, made from the same
settings and the same features, is skipped: a second run does no work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FeatureCacheError, UsageError
from .tables import PipelineText, spec_from_table
from .consistency import check_ensemble_validation, check_report_head, check_taps
from ..extract.stage import ExtractSpec, extract
from ..fit.stage import FitSpec, fit_head, head_validation, make_ensemble
from ..fit.headstore import default_head_name, read_record, stale_members
from ..report.page import ReportSpec, build_report, default_output, is_current, is_report_page, report_inputs
from ..cache.integrity import refuse_inside_cache
from ..cache.layout import FINETUNE_DIR, FINETUNE_RECORD, finetune_run_name
from ..cache.store import Cache, open_cache


@dataclass(frozen=True, kw_only=True)
class EnsembleStep:
    """Soft voting over heads of the pipeline, saved as a head."""

    members: tuple[str, ...]  # names of the [[heads]] to combine
    name: str = "ensemble"
    weights: tuple[float, ...] | None = None  # one per member; default equal


@dataclass(frozen=True, kw_only=True)
class Pipeline:
    """A validated pipeline file: one spec per step."""

    path: Path
    name: str
    extract: ExtractSpec
    heads: tuple[FitSpec, ...] = ()
    ensemble: EnsembleStep | None = None
    finetune: Any = None  # a FinetuneSpec (imported lazily: finetune pulls in the training code)
    report: ReportSpec = field(default_factory=ReportSpec)


@dataclass
class StepOutcome:
    step: str  # "extract", "head logistic", "ensemble vote", "finetune ...", "report"
    cached: bool  # True: the result was already there, nothing was computed
    summary: str
    seconds: float


@dataclass
class PipelineResult:
    cache_path: Path
    report_path: Path
    steps: list[StepOutcome]


# ---------------------------------------------------------------- loading and validation

def _resolve_path(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    try:
        return str((base / path).resolve())
    except (RuntimeError, OSError):  # a symlink loop: left for the existence checks to report
        return os.path.abspath(base / path)


def _not_a_folder(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` (or itself) when it is not a folder, else None."""
    for part in (path, *path.parents):
        if part.exists():
            return None if part.is_dir() else part
    return None


def _check_source(source: PipelineText, spec: ExtractSpec, base: Path) -> ExtractSpec:
    value = spec.source
    prefix, _, rest = value.partition(":")
    if value.lower() == "digits":
        return spec
    if prefix.lower() in ("cifar10", "cifar100") and rest:
        root = _resolve_path(rest, base)
        if not Path(root).is_dir():
            raise source.error(f"no such folder {root} (relative paths are relative to {base})", "extract", 0, "source")
        return dataclasses.replace(spec, source=f"{prefix.lower()}:{root}")
    resolved = _resolve_path(value, base)
    if not Path(resolved).exists():
        raise source.error(f"no such folder or CSV file {resolved} (relative paths are relative to {base})",
                           "extract", 0, "source")
    return dataclasses.replace(spec, source=resolved)


def load_pipeline(path: str | Path, *, root: str | Path | None = None) -> Pipeline:
    """Read and validate a pipeline file; UsageError (file:line: field: what is wrong) otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"no pipeline file {path}; see pipelines/ for examples") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read pipeline file {path}: {error}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        match = re.search(r"line (\d+)", str(error))
        line = match.group(1) if match else max(len(text.splitlines()), 1)  # "at end of document"
        raise UsageError(f"{path}:{line}: not valid TOML: {error}") from None
    source, base = PipelineText(path, text), path.resolve().parent
    known = ("pipeline", "extract", "heads", "ensemble", "finetune", "report")
    for key in data:
        if key not in known:
            raise source.error(f"unknown table; expected: {', '.join(known)}", key, label=key)
    settings = data.get("pipeline", {})
    if not isinstance(settings, dict) or set(settings) - {"name", "root"}:
        bad = next(iter(set(settings) - {"name", "root"}), None) if isinstance(settings, dict) else None
        raise source.error("unknown field; expected one of: name, root", "pipeline", 0, bad, f"pipeline.{bad}")
    for key in ("name", "root"):
        if key in settings and not isinstance(settings[key], str):
            raise source.error("must be a string (in quotes)", "pipeline", 0, key, f"pipeline.{key}")
    root_given = root is not None
    root = str(root) if root_given else (_resolve_path(settings["root"], base) if "root" in settings else None)
    blocker = _not_a_folder(Path(root)) if root is not None else None
    if blocker is not None:
        where = f"{root} is a file" if blocker == Path(root) else f"{root} is under {blocker}, a file"
        message = f"{where}, not a folder; give a cache folder"
        raise UsageError(f"--root: {message}") if root_given else source.error(message, "pipeline", 0, "root")
    if "extract" not in data:
        raise source.error("missing the [extract] table (at least: source = \"digits\" or a folder)")
    extract_spec = spec_from_table(source, ExtractSpec, data["extract"], "extract", exclude=("root",),
                                   fixed={"root": root})
    extract_spec = _check_source(source, extract_spec, base)
    weights, named = extract_spec.weights, ("random", "imagenet", "pretrained", "default")
    candidate = Path(_resolve_path(weights, base)) if weights.strip() else None
    if candidate is not None and (Path(weights).suffix.lower() in (".pt", ".pth", ".bin", ".safetensors")
                                  or weights.strip().lower() not in named and candidate.exists()):
        extract_spec = dataclasses.replace(extract_spec, weights=str(candidate))  # relative to the file, as documented
        if not candidate.is_file():
            what = "is a folder, not a weights file" if candidate.exists() else "does not exist"
            raise source.error(f"weights file {candidate} {what} (relative paths are relative to {base})",
                               "extract", 0, "weights")
    _check_backbone(source, extract_spec)
    _checked(source, lambda: _check_extract_spec(extract_spec), "extract", 0, data["extract"])

    tables = data.get("heads", [])
    if not isinstance(tables, list):
        raise source.error("must be an array of tables: write [[heads]] once per head", "heads", label="heads")
    heads = tuple(spec_from_table(source, FitSpec, table, "heads", i, f"heads[{i + 1}]", exclude=("overwrite",))
                  for i, table in enumerate(tables))
    names: list[str] = []
    for i, head in enumerate(heads):
        _check_head(source, head, i)
        name = head.name or default_head_name(head.head)
        if name in names:
            raise source.error(f"a second head named {name!r}; give one a different name", "heads", i, "head",
                               f"heads[{i + 1}].name")
        names.append(name)
    check_taps(source, extract_spec.taps, heads)
    ensemble = None
    if "ensemble" in data:
        ensemble = spec_from_table(source, EnsembleStep, data["ensemble"], "ensemble")
        _checked(source, lambda: _check_ensemble(ensemble), "ensemble", 0, data["ensemble"])
        unknown = [m for m in ensemble.members if m not in names]
        if unknown:
            raise source.error(f"{unknown[0]!r} is not a head of this pipeline (heads: {', '.join(names) or 'none'})",
                               "ensemble", 0, "members")
        check_ensemble_validation(source, extract_spec, heads, names, ensemble)
    finetune = None
    if "finetune" in data:
        from ..finetune.stage import FinetuneSpec

        finetune = spec_from_table(source, FinetuneSpec, data["finetune"], "finetune", exclude=("restart",))
        from ..finetune.stage import check_finetune_spec, with_default_unfreeze

        _checked(source, lambda: check_finetune_spec(finetune), "finetune", 0, data["finetune"])
        if finetune.head is not None and finetune.head not in names:
            raise source.error(f"{finetune.head!r} is not a head of this pipeline (heads: {', '.join(names) or 'none'})",
                               "finetune", 0, "head")
        try:
            finetune = with_default_unfreeze(finetune, extract_spec.model)
        except FeatureCacheError:
            pass  # an unknown model is reported by the [extract] check
        needed = _fast_path_tap(extract_spec.model, finetune.unfreeze) if finetune.from_cache else None
        if needed and needed not in extract_spec.taps:
            raise source.error(f"needs the activations of tap {needed}: add it to [extract] taps "
                               f"(e.g. taps = [\"pool\", \"{needed}\"])", "finetune", 0, "from_cache")
    report = spec_from_table(source, ReportSpec, data.get("report", {}), "report", exclude=("overwrite",))
    if report.max_points < 10 or report.worst < 0:
        key = "max_points" if report.max_points < 10 else "worst"
        raise source.error("max_points must be at least 10 and worst at least 0", "report", 0, key, f"report.{key}")
    check_report_head(source, report.head, names, ensemble)
    if report.output:
        report = dataclasses.replace(report, output=_resolve_path(report.output, base))
    return Pipeline(path=path, name=settings.get("name", path.stem), extract=extract_spec, heads=heads,
                    ensemble=ensemble, finetune=finetune, report=report)


def _fast_path_tap(model: str, unfreeze: str) -> str | None:
    """The cached tap finetune --from-cache would start from (None when it cannot be told
    before the run, or no tap can hold it: the run refuses then, saying why)."""
    import torch

    from ..backbones.registry import get_backbone, staged_backbone
    from ..finetune.stage import parse_unfreeze

    try:
        entry = get_backbone(model)
        with torch.device("meta"):
            staged = staged_backbone(entry, entry.build())
        blocks = parse_unfreeze(staged, unfreeze)
    except Exception:  # an unknown model or --unfreeze value is reported where it is checked
        return None
    return staged.input_tap(staged.block_stage(blocks[0]))


def _check_backbone(source: PipelineText, spec: ExtractSpec) -> None:
    from ..backbones.registry import get_backbone, validate_taps

    try:
        entry = get_backbone(spec.model)
    except FeatureCacheError as error:
        raise source.error(str(error), "extract", 0, "model") from None
    try:
        validate_taps(entry, spec.taps)
    except FeatureCacheError as error:
        raise source.error(str(error), "extract", 0, "taps") from None


def _check_head(source: PipelineText, spec: FitSpec, index: int) -> None:
    from ..fit.stage import check_fit_spec
    from ..heads.registry import SKLEARN_PREFIX, available_heads, make_head

    known = spec.head in available_heads() or spec.head.startswith(SKLEARN_PREFIX)
    try:
        make_head(spec.head, **spec.params)
    except (FeatureCacheError, TypeError) as error:
        key = "params" if known else "head"
        raise source.error(str(error), "heads", index, key, f"heads[{index + 1}].{key}") from None
    table = {f.name: None for f in dataclasses.fields(FitSpec)}
    _checked(source, lambda: check_fit_spec(spec), "heads", index, table, f"heads[{index + 1}]")


def _check_extract_spec(spec: ExtractSpec) -> None:
    from ..extract.stage import _check_spec

    _check_spec(spec)


def _check_ensemble(step: EnsembleStep) -> None:
    from ..fit.headstore import check_head_name

    check_head_name(step.name, "ensemble")
    if step.name in step.members:
        raise UsageError(f"name: an ensemble cannot take the name of its member {step.name!r}")
    if not step.members:
        raise UsageError("members: name at least one head to ensemble")
    repeated = sorted({m for m in step.members if step.members.count(m) > 1})
    if repeated:
        raise UsageError(f"members: a head is named twice ({', '.join(repeated)})")
    if step.weights is not None and (len(step.weights) != len(step.members)
                                     or not all(math.isfinite(w) and w >= 0 for w in step.weights)
                                     or sum(step.weights) <= 0):
        raise UsageError("weights: one finite, non-negative weight per member, not all zero")


def _checked(source: PipelineText, check: Callable[[], None], table: str, index: int, values: dict,
             label: str | None = None) -> None:
    """Run a stage's own validation; its error as `file:line: table.field: message`."""
    try:
        check()
    except FeatureCacheError as error:
        message = str(error)
        lowered = message.lower()
        keys = sorted(values, key=len, reverse=True) if isinstance(values, dict) else []
        key = next((k for k in keys if lowered.startswith(f"{k} ") or lowered.startswith(f"{k}:")
                    or f"--{k.replace('_', '-')}" in lowered), None)
        if key is None and re.match(r"bad [a-z ]*name", lowered):
            key = "name"
        if key is None:
            key = next((k for k in keys if re.search(rf"\b{re.escape(k)}\b", lowered)), None)
        where = label or table
        raise source.error(message.removeprefix(f"{key}: ") if key else message, table, index, key,
                           f"{where}.{key}" if key else where) from None


# ---------------------------------------------------------------- running

def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _same_settings(saved: dict, spec, ignore: tuple[str, ...]) -> bool:
    """Whether a stored spec (JSON) holds `spec`'s settings; a field it lacks counts as its default."""
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else
                         f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                for f in dataclasses.fields(spec)}
    wanted = _normalised(dataclasses.asdict(spec))
    return all(saved.get(k, _normalised(defaults[k])) == v for k, v in wanted.items() if k not in ignore)


def _head_is_current(cache: Cache, spec: FitSpec) -> bool:
    try:
        record = read_record(cache, spec.name or default_head_name(spec.head))
    except FeatureCacheError:  # missing or damaged: fit it (again)
        return False
    validation = head_validation(record)  # a head that carved by position is fitted again, by path
    return (record.get("cache_key") == cache.key and (validation["split"] != "train" or "carve" in validation)
            and _same_settings(record.get("spec") or {}, spec, ("name", "overwrite")))


def _ensemble_is_current(cache: Cache, step: EnsembleStep) -> bool:
    try:
        record = read_record(cache, step.name)
    except FeatureCacheError:
        return False
    weights = step.weights or (1.0,) * len(step.members)
    total = sum(weights)
    return (record.get("head") == "ensemble" and record.get("cache_key") == cache.key
            and not stale_members(cache, record)
            and record.get("members") == list(step.members) and len(record.get("weights", [])) == len(weights)
            and all(abs(a - b / total) < 1e-9 for a, b in zip(record["weights"], weights)))


def _finetune_same(saved: dict, spec) -> bool:
    """Whether a finetune record's spec holds `spec`'s settings as the finetune command's own resume
    check compares them (finetune/spec.py: not those that leave the numbers as they are, nor the
    augmentation a --from-cache run never uses), and names the same run."""
    from ..finetune.spec import resume_settings, spec_dict

    settings = spec_dict(spec)
    return _same_settings(saved, spec, tuple(set(settings) - set(resume_settings(settings)) - {"name"}))


def _finetune_done(cache: Cache, spec) -> dict | None:
    from ..report.page import finetune_records

    for record in finetune_records(cache):
        if (record.get("complete") and record.get("parent_key") == cache.key
                and _finetune_same(record.get("spec") or {}, spec)):
            return record
    return None


def _finetune_differs(cache: Cache, spec) -> bool:
    """True when the folder this spec writes to holds a run with other settings."""
    if spec.name is None and spec.head is None:
        return False  # the folder name depends on the best head; let finetune decide
    name = spec.name or finetune_run_name(spec.head, spec.unfreeze, spec.from_cache)
    path = cache.path / FINETUNE_DIR / name / FINETUNE_RECORD
    if not path.exists():
        return False
    try:
        saved = json.loads(path.read_text(encoding="utf-8")).get("spec", {})
    except (OSError, json.JSONDecodeError):
        return True
    return not _finetune_same(saved, spec)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _report_spec(pipeline: Pipeline) -> ReportSpec:
    """The report step's spec, checked before any step: the pipeline rewrites its own page at
    `[report] output` on each run, never another file (a typo must not replace one)."""
    output = pipeline.report.output
    if not output:
        return pipeline.report  # the entry's own report
    if Path(output).is_file() and not is_report_page(Path(output)):
        raise UsageError(f"{pipeline.path}: [report] output {output} exists and is not a featurecache report; "
                         "delete it or choose another output")
    refuse_inside_cache(Path(output))
    return dataclasses.replace(pipeline.report, overwrite=True)


def run_pipeline(pipeline: Pipeline, *, on_step: Callable[[StepOutcome], None] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 finetune_progress: Callable[[dict], None] | None = None) -> PipelineResult:
    """Run every step, skipping those whose result is already cached; report each as it ends."""
    steps: list[StepOutcome] = []
    report_spec = _report_spec(pipeline)

    def done(step: str, cached: bool, summary: str, started: float) -> None:
        steps.append(StepOutcome(step, cached, summary, time.perf_counter() - started))
        if on_step:
            on_step(steps[-1])

    started = time.perf_counter()
    extracted = extract(pipeline.extract, progress=progress)
    rows = ", ".join(f"{split} {count}" for split, count in extracted.splits.items())
    done("extract", extracted.cache_hit, f"{rows}; {len(extracted.skipped)} skipped; {extracted.path}", started)
    cache = open_cache(extracted.path)
    changed: set[str] = set()
    for spec in pipeline.heads:
        started, name = time.perf_counter(), spec.name or default_head_name(spec.head)
        cached = _head_is_current(cache, spec)
        if not cached:  # the pipeline owns the names of its heads: it replaces an outdated one
            fit_head(cache, dataclasses.replace(spec, overwrite=True))
            changed.add(name)
        headline = read_record(cache, name)["headline"]
        done(f"head {name}", cached, f"{headline['split']} top-1 {_pct(headline['top1'])}", started)
    if pipeline.ensemble:
        step, started = pipeline.ensemble, time.perf_counter()
        cached = not changed.intersection(step.members) and _ensemble_is_current(cache, step)
        if not cached:
            make_ensemble(cache, list(step.members), name=step.name,
                          weights=list(step.weights) if step.weights else None, overwrite=True)
        headline = read_record(cache, step.name)["headline"]
        done(f"ensemble {step.name}", cached, f"{headline['split']} top-1 {_pct(headline['top1'])}", started)
    if pipeline.finetune is not None:
        from ..finetune.stage import finetune

        spec, started = pipeline.finetune, time.perf_counter()
        refitted = bool(changed) if spec.head is None else spec.head in changed  # its starting head changed
        record = None if refitted else _finetune_done(cache, spec)
        cached = record is not None
        if not cached:
            # Start over when the starting head was refitted in this run, or when the run's folder
            # holds a run of other settings (the file was edited); otherwise resume it.
            restart = refitted or _finetune_differs(cache, spec)
            record = finetune(cache, dataclasses.replace(spec, restart=restart), finetune_progress).record
        test = (record.get("test_metrics") or {}).get("top1")
        done(f"finetune {record['name']}", cached, f"best val top-1 {_pct(record.get('best_val_top1'))}"
             + (f", test top-1 {_pct(test)}" if test is not None else ""), started)
    started = time.perf_counter()
    report_path = Path(pipeline.report.output) if pipeline.report.output else default_output(cache)
    cached = is_current(report_path, report_inputs(cache, pipeline.report))
    if not cached:
        report_path = build_report(cache, report_spec).path
    done("report", cached, str(report_path), started)
    return PipelineResult(cache.path, report_path, steps)
