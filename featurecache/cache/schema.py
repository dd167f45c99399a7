"""The one schema of the records featurecache reads back: the manifest and head records.

Every `manifest.json` and every head record (the metadata of `head.safetensors`) goes
through these models before any of its values is used, so a field edited by hand or
damaged on disk becomes one line naming the file and the field (`InvalidRecordError`,
exit code 2), never a wrong dtype handed to numpy, a path outside the entry or a
crash of the interpreter. The models check types strictly (no "5" for 5, no true for
1), allowed values (storage dtypes, precisions), shapes and counts, and every value
that is used to build a path: shard files, split and tap names, the weights hash that
names `_weights/<sha256>.safetensors`, head and member names.

Unknown keys are kept (`extra="allow"`): a newer featurecache (or another branch's
feature) may add fields, and an older reader must not refuse them. Known keys are
typed strictly. Validation returns nothing; callers keep using the plain dicts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from ..errors import InvalidRecordError
from ..options import COMPRESSIONS, CROP_MODES, DTYPES, ON_ERROR, PRECISIONS, RESOLVED_PRECISIONS

STORAGE_DTYPES = DTYPES
ITEMSIZE = {"float16": 2, "float32": 4}
#: Bytes every shard row costs at least whatever the compression: labels and index
#: (int64) and the 32-byte fingerprint are stored uncompressed.
MIN_ROW_BYTES = 48
#: Largest side of a tap's per-image shape (channels or pixels); far above any real network's.
MAX_DIMENSION = 1 << 16

Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
#: Split and tap names become file names (shards/<split>-00000.h5): no separators, no dot first.
SplitName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
TapName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_]{0,63}$")]
#: Head, ensemble-member and finetune-run names are folder names under the entry.
HEAD_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$"
HeadName = Annotated[str, StringConstraints(pattern=HEAD_NAME_PATTERN)]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]
Dimension = Annotated[int, Field(ge=1, le=MAX_DIMENSION)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Checksum = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]


class Record(BaseModel):
    """Strict types for the known keys; unknown keys are allowed and kept."""

    model_config = ConfigDict(extra="allow", strict=True)


# ------------------------------------------------------------------ the manifest


class FeatureLayout(Record):
    offset: Count
    checksum: Annotated[str, StringConstraints(pattern=r"^xxh3_64:[0-9a-f]{16}$")]


class ShardRecord(Record):
    file: str
    split: SplitName
    rows: Count
    sha256: Hex64
    bytes: Count
    features: dict[TapName, FeatureLayout] | None = None

    @model_validator(mode="after")
    def _confined(self) -> "ShardRecord":
        if not re.fullmatch(rf"shards/{re.escape(self.split)}-[0-9]{{5}}\.h5", self.file):
            raise ValueError(f"shard file {self.file!r} is not shards/{self.split}-NNNNN.h5 "
                             "(a path outside the entry, or another split's name)")
        if self.rows * MIN_ROW_BYTES > self.bytes:
            raise ValueError(f"{self.rows} rows cannot fit in {self.bytes} bytes")
        return self


class SkipRecord(Record):
    path: str
    reason: str
    fingerprint: str


class CopyRecord(Record):
    """An image whose bytes are another's, in another split or under another class."""

    path: str
    split: SplitName
    label: str  # its class name; "" when unlabelled
    original: str
    original_split: SplitName
    original_label: str


class WeightsRecord(Record):
    spec: str
    description: str
    sha256: Hex64
    file: str

    @model_validator(mode="after")
    def _named_by_hash(self) -> "WeightsRecord":
        if self.file != f"../_weights/{self.sha256}.safetensors":
            raise ValueError(f"weights file {self.file!r} is not ../_weights/<sha256>.safetensors of its sha256")
        return self


class PreprocessingRecord(Record):
    resize_size: Annotated[int, Field(ge=1, le=16384)]
    crop_size: Annotated[int, Field(ge=1, le=16384)]
    interpolation: Literal["nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos"]
    mean: Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=3, max_length=3)]
    std: Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(min_length=3, max_length=3)]
    jpeg_draft: bool = False
    crop_pct: Annotated[float, Field(gt=0, le=4, allow_inf_nan=False)] | None = None
    crop_mode: Literal[CROP_MODES] | None = None


class SourceRecord(Record):
    kind: str
    name: str
    root: str


class ConfigRecord(Record):
    arch: str
    weights_sha256: Hex64
    taps: Annotated[list[TapName], Field(min_length=1)]
    preprocessing: PreprocessingRecord
    dtype: Literal[DTYPES]
    precision: Literal[RESOLVED_PRECISIONS]
    source: SourceRecord
    fingerprint: str


class TapRecord(Record):
    shape: Annotated[list[Dimension], Field(min_length=1, max_length=4)]


class SpecRecord(Record):
    """The ExtractSpec the entry was made with: `verify --repair` runs it again."""

    source: Annotated[str, StringConstraints(min_length=1)]
    model: str
    weights: str
    taps: Annotated[list[TapName], Field(min_length=1)]
    image_size: Annotated[int, Field(ge=16, le=16384)] | None = None
    crop_mode: Literal[CROP_MODES] | None = None
    dtype: Literal[DTYPES]
    precision: Literal[PRECISIONS] = "auto"
    device: str = "auto"
    batch_size: Positive = 64
    workers: Count | None = None
    shard_size: Positive = 4096
    compression: Literal[COMPRESSIONS[1:]] | None = None
    on_error: Literal[ON_ERROR] = "skip"
    content_hash: bool = False
    seed: int = 0
    root: str | None = None
    max_consecutive_failures: Positive = 50
    lock_timeout: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 10.0
    draft: bool = False
    optimize: str = "auto"


class Manifest(Record):
    format_version: Literal[1]
    tool_version: str
    entry_id: Hex64
    key: Hex64
    complete: bool
    config: ConfigRecord
    weights: WeightsRecord
    spec: SpecRecord
    classes: list[str]
    dtype: Literal[DTYPES]
    taps: Annotated[dict[TapName, TapRecord], Field(min_length=1)]
    created: str
    shards: list[ShardRecord]
    skipped: list[SkipRecord]
    splits: dict[SplitName, Count]
    copies: list[CopyRecord] = []  # byte-identical images across splits or classes (data/copies.py)
    updated: str | None = None
    checksum: Checksum | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if self.dtype != self.config.dtype:
            raise ValueError(f"dtype {self.dtype!r} differs from config.dtype {self.config.dtype!r}")
        if self.weights.sha256 != self.config.weights_sha256:
            raise ValueError("weights.sha256 differs from config.weights_sha256")
        if sorted(self.taps) != sorted(self.config.taps):
            raise ValueError(f"taps {sorted(self.taps)} differ from config.taps {sorted(self.config.taps)}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("a class is listed twice in classes")
        seen: set[str] = set()
        for number, shard in enumerate(self.shards):
            if shard.file in seen:
                raise ValueError(f"shards.{number}: {shard.file} is listed twice")
            seen.add(shard.file)
            if shard.split not in self.splits:
                raise ValueError(f"shards.{number}: split {shard.split!r} is not in splits")
            for tap, layout in (shard.features or {}).items():
                if tap not in self.taps:
                    raise ValueError(f"shards.{number}.features: tap {tap!r} is not in taps")
                size = ITEMSIZE[self.dtype] * shard.rows
                for dimension in self.taps[tap].shape:
                    size *= dimension
                if layout.offset + size > shard.bytes:
                    raise ValueError(f"shards.{number}.features.{tap}: {shard.rows} rows at offset "
                                     f"{layout.offset} run past the file's {shard.bytes} bytes")
        return self


# ------------------------------------------------------------------ head records


class MetricsRecord(Record):
    n: Count
    top1: Probability | None = None
    top5: Probability | None = None
    log_loss: float | None = None
    per_class_accuracy: dict[str, Probability | None] = {}
    confusion_matrix: list[list[Count]] = []


class HeadlineRecord(Record):
    split: str
    top1: Probability | None = None
    note: str = ""


class HeadConfigRecord(Record):
    head: str
    params: dict[str, Any]
    n_classes: Positive
    n_features: Positive


#: The head type of a soft vote over heads of several entries of one source (fit/cross_ensemble.py).
CROSS_ENSEMBLE = "cross-ensemble"
#: A sibling entry's folder name: joined to the cache root, so no separator and no "." or "..".
EntryName = Annotated[str, StringConstraints(pattern=r"^[^/\\\x00]{1,255}$")]


class CrossMemberRecord(Record):
    """One member of an ensemble across entries: which entry (and which version of it) and which head."""

    entry: EntryName
    cache_key: Hex64
    head: HeadName
    checksum: Checksum
    tap: TapName

    @model_validator(mode="after")
    def _no_dots(self) -> "CrossMemberRecord":
        if self.entry in (".", ".."):
            raise ValueError(f"entry {self.entry!r} is not a folder name")
        return self


class AlignmentRecord(Record):
    """How one split's rows were matched by path across entries: rows scored, rows left out and why."""

    rows: Count
    left_out: Count
    missing: dict[str, Count] = {}  # member -> rows of the other entries its entry lacks
    examples: list[str] = []


class HeadRecord(Record):
    name: HeadName
    head: str
    tap: TapName
    cache_key: Hex64
    classes: list[str]
    metrics: dict[str, MetricsRecord]
    headline: HeadlineRecord
    config: HeadConfigRecord
    fit_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    chosen: dict[str, Any] | None = None  # the hyper-parameters chosen on validation
    members: list[HeadName] | None = None
    weights: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None
    member_checksums: dict[HeadName, Checksum] | None = None
    cross_members: list[CrossMemberRecord] | None = None
    alignment: dict[str, AlignmentRecord] | None = None
    checksum: Checksum | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "HeadRecord":
        if self.config.head != self.head:
            raise ValueError(f"config.head {self.config.head!r} differs from head {self.head!r}")
        if self.config.n_classes != len(self.classes):
            raise ValueError(f"config.n_classes {self.config.n_classes} differs from the {len(self.classes)} classes")
        if self.headline.split not in self.metrics:  # every fit scores its headline split
            raise ValueError(f"headline.split {self.headline.split!r} has no metrics")
        for split, metrics in self.metrics.items():
            matrix = metrics.confusion_matrix
            if matrix and (len(matrix) != len(self.classes) or any(len(row) != len(self.classes) for row in matrix)):
                raise ValueError(f"metrics.{split}.confusion_matrix is not {len(self.classes)} x {len(self.classes)}")
        if self.head == "ensemble":
            members = self.members or []
            if not members or len(set(members)) != len(members):
                raise ValueError("an ensemble needs members, each named once")
            if self.name in members:
                raise ValueError(f"the ensemble {self.name!r} lists itself as a member")
            if self.config.params.get("members") != members:
                raise ValueError("config.params.members differs from members")
        if self.head == CROSS_ENSEMBLE:
            labels = [f"{m.entry}:{m.head}" for m in self.cross_members or []]
            if len(labels) < 2 or len(set(labels)) != len(labels):
                raise ValueError("an ensemble across entries needs two members or more, each named once")
            if self.weights is None or len(self.weights) != len(labels) or sum(self.weights) <= 0:
                raise ValueError(f"weights must be {len(labels)} non-negative numbers, not all zero")
            if self.config.params.get("members") != labels:
                raise ValueError("config.params.members differs from cross_members")
        return self


# ------------------------------------------------------------------ validation


def _describe(error: ValidationError, file: Path | str) -> str:
    problems = error.errors(include_url=False)
    first = problems[0]
    location = ".".join(str(part) for part in first["loc"])
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) or first["type"] in ("missing", "value_error") else f" (got {got!r:.60})"
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    field = f"field {location}: " if location else ""
    return f"{file}: {field}{message}{shown}{more}"


def check(model: type[Record], data: Any, file: Path | str, advice: str) -> None:
    """Validate `data` against `model`; InvalidRecordError naming the file and field otherwise."""
    if not isinstance(data, dict):
        raise InvalidRecordError(f"{file}: expected a JSON object, got {type(data).__name__}; {advice}")
    try:
        model.model_validate(data)
    except ValidationError as error:
        raise InvalidRecordError(f"{_describe(error, file)}; {advice}") from None
    except (RecursionError, OverflowError, ValueError, TypeError) as error:  # absurd nesting or numbers
        raise InvalidRecordError(f"{file}: not a valid record ({type(error).__name__}); {advice}") from None


def check_manifest(data: Any, file: Path | str) -> None:
    check(Manifest, data, file, "correct that field, or delete the entry and run featurecache extract again")


def check_head_record(data: Any, file: Path | str) -> None:
    check(HeadRecord, data, file, "fit the head again (with --overwrite)")
