"""Compare backbones: extract each over one dataset, fit the same heads on each, tabulate.

Every model goes through the ordinary extract stage (a complete entry with the same key
is reused, not recomputed) and the ordinary fit-head stage, so each figure here is the
one `extract` and `fit-head` would give. The extraction cost is the wall-clock time of
the extract call that computed the features (building the network, decoding, the forward
pass), per image computed; the manifest does not record how long an extraction took, so a
reused entry is labelled "reused" and has no cost rather than an invented one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..errors import FeatureCacheError, HeadError, UsageError

log = logging.getLogger("featurecache")

#: Prefix of the heads compare saves in each entry (replaced by the next compare, never a user's head).
HEAD_PREFIX = "compare-"
BACKBONE_COLUMNS = ("backbone", "input px", "feature dim", "images", "computed", "seconds", "s/image", "img/s",
                    "device", "precision")
HEAD_COLUMNS = ("backbone", "head", "chosen on", "top-1 % there", "reported on", "top-1 %", "fit s")
#: Columns holding numbers (right-aligned in the report).
NUMERIC_COLUMNS = frozenset({"input px", "feature dim", "images", "seconds", "s/image", "img/s", "top-1 % there",
                             "top-1 %", "fit s"})


@dataclass
class HeadScore:
    """One head fitted on one backbone's features (or why it could not be)."""

    head: str  # the head type (logistic, knn, sklearn:...)
    name: str  # the folder under the entry's heads/
    chosen_on: str | None = None  # the split its settings were chosen on: "val" or "val (from train)"
    chosen_top1: float | None = None  # top-1 on that split
    reported_on: str | None = None  # the headline split: test when there is one
    top1: float | None = None  # top-1 on the headline split
    note: str = ""  # the headline's note, e.g. "chosen and reported on the same split (optimistic)"
    fit_seconds: float = 0.0
    error: str | None = None  # the fit's error message when the head failed on this backbone


@dataclass
class BackboneRun:
    """One backbone: its cache entry, what extracting it cost, and its heads' scores."""

    model: str
    entry: Path
    tap: str
    feature_dim: int
    image_size: int  # the crop size the images were run at
    images: int  # rows in the entry
    computed: int  # images run through the backbone by this call (0 when the entry was reused)
    seconds: float | None  # wall-clock seconds of the extract call that computed them; None when reused
    device: str | None  # None when reused (the manifest does not record it)
    precision: str
    weights: str  # the weights' description, e.g. random(seed=0)
    heads: list[HeadScore] = field(default_factory=list)

    @property
    def reused(self) -> bool:
        return self.computed == 0

    @property
    def seconds_per_image(self) -> float | None:
        return self.seconds / self.computed if self.computed and self.seconds else None

    @property
    def images_per_second(self) -> float | None:
        return self.computed / self.seconds if self.computed and self.seconds else None

    @property
    def computed_text(self) -> str:
        """"16", "reused" (nothing computed), or "40 of 398" (the rest reused)."""
        if self.reused:
            return "reused"
        return str(self.computed) if self.computed == self.images else f"{self.computed} of {self.images}"


@dataclass
class Comparison:
    BACKBONE_COLUMNS: ClassVar[tuple[str, ...]] = BACKBONE_COLUMNS  # the columns of backbone_rows()
    HEAD_COLUMNS: ClassVar[tuple[str, ...]] = HEAD_COLUMNS  # the columns of head_rows()
    NUMERIC: ClassVar[frozenset[str]] = NUMERIC_COLUMNS

    source: str
    tap: str
    weights: str  # the --weights asked for (random, pretrained, ...)
    heads: list[str]  # head names, in the order asked
    backbones: list[BackboneRun]

    @property
    def failures(self) -> list[tuple[str, HeadScore]]:
        return [(run.model, score) for run in self.backbones for score in run.heads if score.error]

    @property
    def random_weights(self) -> bool:
        return any(run.weights.startswith("random") for run in self.backbones)

    def backbone_rows(self) -> list[list[str]]:
        """One row per backbone, as text: what extracting it cost (what the CLI prints and the page shows)."""
        return [[run.model, str(run.image_size), str(run.feature_dim), str(run.images), run.computed_text,
                 _number(run.seconds, ".1f"), _number(run.seconds_per_image, ".4f"),
                 _number(run.images_per_second, ".1f"), run.device or "–", run.precision] for run in self.backbones]

    def head_rows(self) -> list[list[str]]:
        """One row per (backbone, head), as text: where its settings were chosen, its top-1 there and reported."""
        rows = []
        for run in self.backbones:
            for score in run.heads:
                if score.error:
                    rows.append([run.model, score.name, "failed: " + score.error, "", "", "", ""])
                    continue
                optimistic = " (optimistic)" if "optimistic" in score.note else ""
                rows.append([run.model, score.name, score.chosen_on or "–", _number(score.chosen_top1, ".1f", 100),
                             (score.reported_on or "–") + optimistic, _number(score.top1, ".1f", 100),
                             f"{score.fit_seconds:.1f}"])
        return rows


def _number(value: float | None, form: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(scale * value, form)


def _head_specs(heads: Sequence, tap: str, val_fraction: float | None, seed: int) -> list:
    """FitSpecs for the heads asked for (names or FitSpecs), each checked; names must differ."""
    from ..fit.headstore import default_head_name
    from ..fit.stage import FitSpec, check_fit_spec

    if isinstance(heads, str) or not heads:
        raise UsageError("name at least one head to fit on every backbone (e.g. --head logistic)")
    specs = []
    for head in heads:
        if isinstance(head, FitSpec):
            spec = dataclasses.replace(head, tap=tap, name=head.name or HEAD_PREFIX + default_head_name(head.head),
                                       overwrite=True)
        elif isinstance(head, str) and head.strip():
            spec = FitSpec(head=head.strip(), name=HEAD_PREFIX + default_head_name(head.strip()), tap=tap,
                           val_fraction=val_fraction, seed=seed, overwrite=True)
        else:
            raise UsageError(f"a head is a name (logistic, knn, mlp, sklearn:...) or a FitSpec, got {head!r}")
        check_fit_spec(spec)
        specs.append(spec)
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise HeadError(f"two heads would be saved under one name ({', '.join(names)}); name each head type once "
                        "(or give each FitSpec its own name)")
    return specs


def check_models(models: Sequence[str], tap: str = "pool", weights: str = "pretrained") -> list[str]:
    """The backbones' canonical names, after refusing too few, duplicates, unknown models or taps,
    and pretrained weights that are not on this machine: all before any extraction starts."""
    from ..backbones.registry import get_backbone, validate_taps

    if isinstance(models, str) or len(models) < 2:
        raise UsageError(f"compare needs at least two backbones, got {len(models) if not isinstance(models, str) else 1}; "
                         "pass --model A --model B")
    names = []
    for model in models:
        if not isinstance(model, str) or not model.strip():
            raise UsageError(f"a backbone name is empty in {list(models)!r}")
        entry = get_backbone(model.strip())  # BackboneError for an unknown name
        validate_taps(entry, (tap,))
        if entry.name in names:
            raise UsageError(f"{model!r} is named twice (as {entry.name}); compare each backbone once")
        if weights.strip().lower() in ("pretrained", "imagenet", "default") and entry.pretrained is not None:
            entry.pretrained()  # WeightsUnavailableError now, not after the backbones before it
        names.append(entry.name)
    return names


def compare_backbones(source: str, models: Sequence[str], heads: Sequence = ("logistic",), *,
                      weights: str = "pretrained", tap: str = "pool", image_size: int | None = None,
                      precision: str = "auto", device: str = "auto", root: str | Path | None = None,
                      val_fraction: float | None = None, seed: int = 0,
                      progress: Callable[[int, int], None] | None = None,
                      on_backbone: Callable[[str, int, int], None] | None = None,
                      **extract_settings) -> Comparison:
    """Extract `source` with each model, fit the same heads on each entry, return the comparison.

    `heads`: head types (logistic, knn, mlp, sklearn:...) or `FitSpec`s; each is saved in
    every entry as `compare-<type>` (or the FitSpec's name), replacing an earlier compare's.
    `extract_settings` go to every `ExtractSpec` (batch_size, workers, dtype, optimize, ...).
    A head that fails on one backbone is recorded with its error (`Comparison.failures`),
    the others go on. `on_backbone(model, number, total)` is called before each extraction.
    """
    from ..cache.store import open_cache
    from ..device import resolve_device
    from ..extract.stage import ExtractSpec, extract
    from ..fit.stage import fit_head

    if not isinstance(source, (str, Path)) or not str(source).strip():
        raise UsageError("the dataset source is empty; pass an image folder, a CSV file, digits, ...")
    if not isinstance(weights, str) or not weights.strip():
        raise UsageError("--weights is empty; use pretrained or random")
    refused = sorted({"source", "model", "taps", "views"} & set(extract_settings))
    if refused:
        raise UsageError(f"compare sets {', '.join(refused)} itself; pass the source, models and tap as arguments")
    names = check_models(models, tap, weights)
    specs = _head_specs(heads, tap, val_fraction, seed)
    base = dict(source=str(source), weights=weights, taps=(tap,), image_size=image_size, precision=precision,
                device=device, root=str(root) if root is not None else None, seed=seed, **extract_settings)
    # The other settings are the same for every model: the first extract checks them before any work.
    resolved_device = str(resolve_device(device))

    runs = []
    for number, model in enumerate(names, 1):
        if on_backbone:
            on_backbone(model, number, len(names))
        result = extract(ExtractSpec(model=model, **base), progress=progress)
        cache = open_cache(result.path)
        computed = 0 if result.cache_hit else result.computed
        run = BackboneRun(
            model=model, entry=result.path, tap=tap, feature_dim=math.prod(cache.tap_shapes[tap]),
            image_size=int(cache.manifest["config"]["preprocessing"]["crop_size"]),
            images=sum(cache.splits.values()), computed=computed,
            seconds=result.seconds if computed else None, device=resolved_device if computed else None,
            precision=cache.manifest["config"]["precision"], weights=cache.manifest["weights"]["description"])
        for spec in specs:
            run.heads.append(_fit(cache, spec, fit_head))
        runs.append(run)
    return Comparison(source=str(source), tap=tap, weights=weights, heads=[s.name for s in specs], backbones=runs)


def _fit(cache, spec, fit_head) -> HeadScore:
    """Fit one head; a failure is recorded on the score (and logged), not raised."""
    score = HeadScore(head=spec.head, name=spec.name)
    try:
        record = fit_head(cache, spec).record
    except FeatureCacheError as error:
        score.error = " ".join(str(error).split())
        log.warning("head %s failed on %s: %s", spec.name, cache.path.name, score.error)
        return score
    chosen = record["selection_split"]
    score.chosen_on, score.chosen_top1 = chosen, record["metrics"].get(chosen, {}).get("top1")
    headline = record["headline"]
    score.reported_on, score.top1, score.note = headline["split"], headline["top1"], headline.get("note", "")
    score.fit_seconds = float(record.get("fit_seconds") or 0.0)
    return score
