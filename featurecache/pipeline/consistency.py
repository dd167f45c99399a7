"""Checks across a pipeline's tables, made before any work (`run --check` and `run`).

Each table may be right on its own and the pipeline still fail after extract: a head on a
tap the extract step does not make, a report on a head the pipeline does not make, an
ensemble of heads chosen on different validation rows. These are refused here, naming the
file, the line and the field, as every other pipeline mistake is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..fit.stage import FitSpec
from ..fit.headstore import default_head_name
from .tables import PipelineText

DEFAULT_FRACTION = 0.2  # what fit-head carves without a val split (fit/stage.py)


def check_taps(source: PipelineText, taps: Sequence[str], heads: Sequence[FitSpec]) -> None:
    for i, head in enumerate(heads):
        if head.tap not in taps:
            raise source.error(f"tap {head.tap!r} is not made by the extract step (its taps: {', '.join(taps)}); "
                               f"add it to [extract] taps, or fit on one of those", "heads", i, "tap",
                               f"heads[{i + 1}].tap")


def check_report_head(source: PipelineText, head: str | None, names: Sequence[str], ensemble: Any) -> None:
    """The report's head must be one the pipeline makes: the file then reproduces its page on a fresh
    cache root, and the check can tell before any work (a head fitted by hand lives in an entry the
    pipeline only finds after extract; `featurecache report --head` reports it)."""
    made = [*names, *([ensemble.name] if ensemble is not None else [])]
    if head is not None and head not in made:
        raise source.error(f"{head!r} is not a head of this pipeline (heads: {', '.join(made) or 'none'}); to report "
                           "a head fitted outside it, run featurecache report --head NAME", "report", 0, "head")


def _validation(spec: FitSpec, has_val: bool) -> tuple:
    """The rows a head is chosen on, as fit-head decides them."""
    if spec.val_fraction is None and has_val:
        return ("val",)
    return ("train", float(spec.val_fraction if spec.val_fraction is not None else DEFAULT_FRACTION), spec.seed)


def _describe(validation: tuple) -> str:
    if validation == ("val",):
        return "the val split"
    return f"{validation[1]:g} of train with seed {validation[2]}"


def _has_labelled_val(extract_spec: Any) -> bool | None:
    """Whether the source has a labelled val split (None: it cannot be opened; extract says why)."""
    from ..data.sources import open_source
    from ..errors import FeatureCacheError

    try:
        opened = open_source(extract_spec.source, allow_layout=extract_spec.allow_layout,
                             unlabeled=tuple(extract_spec.unlabeled))
    except (FeatureCacheError, OSError):
        return None
    return bool(opened.split_counts().get("val")) and "val" not in opened.unlabeled_splits


def check_ensemble_validation(source: PipelineText, extract_spec: Any, heads: Sequence[FitSpec],
                              names: Sequence[str], ensemble: Any) -> None:
    """Members chosen on different rows are refused by `ensemble`; say so before any work. Whether a
    head without val_fraction is chosen on the val split or on 0.2 of train depends on the source:
    it is opened (listed, never read) only when that decides."""
    if ensemble is None:
        return
    members = [heads[names.index(m)] for m in ensemble.members if m in names]
    if len({_validation(m, True) for m in members}) == 1 and len({_validation(m, False) for m in members}) == 1:
        return  # the same rows whatever the source holds
    has_val = _has_labelled_val(extract_spec)
    if has_val is None:
        return  # the source is reported by extract
    chosen = {name: _validation(m, has_val) for name, m in zip(ensemble.members, members)}
    first = ensemble.members[0]
    for name, validation in chosen.items():
        if validation != chosen[first]:
            raise source.error(
                f"{first!r} is chosen on {_describe(chosen[first])} and {name!r} on {_describe(validation)}: an "
                "ensemble of heads validated on different rows is refused (it would be scored on rows a member "
                "trained on); give its heads the same val_fraction and seed (or none, to use the val split)",
                "ensemble", 0, "members")
