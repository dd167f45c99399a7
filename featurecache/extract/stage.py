"""The extract stage: dataset -> frozen backbone -> a cache entry of HDF5 shards.

Only rows the entry lacks are computed: a rerun with the same inputs is a cache hit,
new or changed files are added incrementally, removed files drop out, and a run that
died resumes after its last committed shard. The manifest is the commit marker: it is
rewritten atomically after every shard, and only shards it lists count. A run that
stores no row (no image could be read, or it failed first) leaves the cache as it found
it: no 0-row entry, no empty folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..backbones.registry import StagedBackbone, build_network, get_backbone, staged_backbone, tap_shape, validate_taps
from .distributed import Group, join_group
from ..device import resolve_precision
from .engine import default_workers, run_backbone
from ..errors import (CacheNotFoundError, CorruptCacheError, ExtractionError, FeatureCacheError, SourceError,
                      UnreadableImageError, UsageError)
from ..faults import fault_point
from ..options import COMPRESSIONS, CROP_MODES, DECODES, DTYPES, ON_ERROR, choices
from ..cache.atomic import storage_error
from ..backbones.optimize import optimize_backbone, resolve_optimize
from .plan import Plan, make_plan
from .writer import ShardPipeline
from ..data.sources import FileSource, open_source, printable_path
from ..cache.layout import LOCK, MANIFEST, SHARDS_DIR, WEIGHTS_DIR, weights_file
from ..cache.manifest import new_manifest, write_manifest
from ..cache.views import check_view_count, parse_policy
from ..cache.coverage import untaught_classes_of
from ..data.copies import copy_records, copy_warnings, find_copies, merge_records
from ..cache.store import (content_key, default_root, entry_dir_name, entry_id, entry_lock, open_cache,
                    read_manifest, shard_size_problem)
from ..backbones.weights import read_checkpoint, resolve_weights, store_weights

log = logging.getLogger("featurecache")



@dataclass(frozen=True, kw_only=True)
class ExtractSpec:
    """Everything `extract` needs; stored in the manifest of the entry it makes."""

    source: str  # image folder, CSV file, "digits", "cifar10:ROOT", "tinyimagenet:ROOT", ... (featurecache sources)
    model: str = "resnet50"
    weights: str = "imagenet"  # imagenet | an enum name | random | path to a state dict
    taps: tuple[str, ...] = ("pool",)
    image_size: int | None = None  # overrides the weights' crop size (and scales the resize)
    crop_mode: str | None = None  # overrides the resize/crop rule: center, squash or border (timm's modes), in the key
    dtype: str = "float16"  # storage dtype of the features
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast of the forward pass)
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None  # DataLoader workers; None picks from the machine
    shard_size: int = 4096  # images per shard: the unit of resume
    compression: str | None = None  # None, "lzf" or "gzip"
    on_error: str = "skip"  # skip unreadable images (listed in the manifest) or fail
    content_hash: bool = False  # fingerprint files by content instead of size + mtime
    seed: int = 0  # for --weights random
    root: str | None = None  # cache root; default $FEATURECACHE_ROOT or ./cache
    max_consecutive_failures: int = 50
    lock_timeout: float = 10.0
    draft: bool = False  # JPEG draft decoding (libjpeg's 1/2..1/8 scaling): faster, changes numbers, in the key
    optimize: str = "auto"  # auto | eager | freeze | compile: how the forward pass is built (see optimize.py)
    name: str | None = None  # names the entry's folder (default: the source's name); not in the key
    allow_layout: bool = False  # read a folder whose layout looks wrong anyway (see layout.py)
    unlabeled: tuple[str, ...] = ()  # split folders of an image folder whose images have no label
    decode: str = "pil"  # pil | torch (torchvision.io + tensor resize, on the device; see tensor_decode.py), in the key
    views: int = 0  # augmented views per train image, a keyed view set beside the entry (see cache/views.py)
    augment: str = "crop-flip"  # the views' policy: crop-flip, crop, flip, or crop-flip:LO-HI (area range)
    view_seed: int = 0  # seeds the views' crops and flips (with each image's fingerprint and the view index)


@dataclass
class ExtractResult:
    path: Path
    key: str
    cache_hit: bool
    splits: dict[str, int]
    computed: int  # images run through the backbone in this call
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    unlabeled_splits: list[str] = field(default_factory=list)  # cached, never fitted or scored
    notes: list[str] = field(default_factory=list)  # what else was done, e.g. a damaged checkpoint restored
    warnings: list[str] = field(default_factory=list)  # what the user must look at, e.g. classes left untaught
    views: object = None  # a ViewsResult when views were asked for (extract/views.py)

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 and self.computed else 0.0


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_spec(spec: ExtractSpec) -> None:
    """Refuse bad settings before any work, one message per field."""
    if not isinstance(spec.source, str) or not spec.source.strip():
        raise UsageError("the dataset source is empty; pass an image folder, a CSV file, digits, or cifar10:ROOT")
    if not isinstance(spec.weights, str) or not spec.weights.strip():
        raise UsageError("--weights is empty; use imagenet, random, an enum name or a path to a checkpoint")
    if not isinstance(spec.taps, (tuple, list)) or not spec.taps or not all(isinstance(t, str) for t in spec.taps):
        raise UsageError(f"--tap must name at least one tap (pool, or another the model offers), got {spec.taps!r}")
    if spec.image_size is not None and (not _integer(spec.image_size) or not 16 <= spec.image_size <= 4096):
        raise UsageError(f"--image-size must be an integer from 16 to 4096, got {spec.image_size!r}")
    if spec.crop_mode is not None and spec.crop_mode not in CROP_MODES:
        raise UsageError(f"unknown --crop-mode {spec.crop_mode!r}; use {choices(CROP_MODES)}")
    for name in ("batch_size", "shard_size", "max_consecutive_failures"):
        value = getattr(spec, name)
        if not _integer(value) or not 1 <= value <= 1 << 24:
            raise UsageError(f"--{name.replace('_', '-')} must be an integer from 1 to {1 << 24}, got {value!r}")
    if spec.workers is not None and (not _integer(spec.workers) or not 0 <= spec.workers <= 1024):
        raise UsageError(f"--workers must be an integer from 0 to 1024, got {spec.workers!r}")
    if not _integer(spec.seed) or not 0 <= spec.seed < 2**63:
        raise UsageError(f"--seed must be a non-negative integer, got {spec.seed!r}")
    if not isinstance(spec.lock_timeout, (int, float)) or isinstance(spec.lock_timeout, bool) or spec.lock_timeout < 0:
        raise UsageError(f"lock_timeout must be a non-negative number of seconds, got {spec.lock_timeout!r}")
    if spec.dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {spec.dtype!r}; use {choices(DTYPES)}")
    if spec.on_error not in ON_ERROR:
        raise UsageError(f"unknown --on-error {spec.on_error!r}; use {choices(ON_ERROR)}")
    if spec.compression is not None and (spec.compression == "none" or spec.compression not in COMPRESSIONS):
        raise UsageError(f"unknown --compression {spec.compression!r}; use {choices(COMPRESSIONS)}")
    if spec.name is not None and (not isinstance(spec.name, str) or not spec.name.strip() or "/" in spec.name or spec.name.startswith(".")):
        raise UsageError(f"--name {spec.name!r} must be a non-empty folder name without '/' or a leading '.'")
    if spec.decode not in DECODES:
        raise UsageError(f"unknown --decode {spec.decode!r}; use {choices(DECODES)}")
    if spec.decode == "torch" and spec.draft:
        raise UsageError("--draft is libjpeg draft decoding through PIL; it does not combine with --decode torch")
    check_view_count(spec.views)
    parse_policy(spec.augment)  # a bad policy is refused even without --views
    if not _integer(spec.view_seed) or not 0 <= spec.view_seed < 2**63:
        raise UsageError(f"--view-seed must be a non-negative integer, got {spec.view_seed!r}")
    if spec.views and spec.decode != "pil":
        raise UsageError("--views decodes images with PIL; it does not combine with --decode torch")


def extract(spec: ExtractSpec | None = None, *, progress: Callable[[int, int], None] | None = None,
            source: object = None, **settings) -> ExtractResult:
    """Build or update the cache entry for `spec`; returns where it is and what was done.

    `extract(ExtractSpec(source="data/photos"))`, or with keyword arguments:
    `extract(source=..., model="resnet18", name="pets")`, where `source` is anything
    `ExtractSpec.source` accepts or a Python object: a torchvision dataset (or a dict of
    them by split), a list of (path, label[, split]) pairs, `(images, labels)` uint8
    arrays, or a Hugging Face `datasets.Dataset`/`DatasetDict` (see hf.py), whose
    columns `image_column=` and `label_column=` name where they are not detected.

    Under torchrun, this process is one rank of a distributed run (see distributed.py).
    """
    prepared = None
    if spec is None:
        if source is None:
            raise UsageError("extract needs an ExtractSpec or source=...")
        if isinstance(source, (str, Path)):
            if "image_column" in settings or "label_column" in settings:
                raise UsageError("image_column and label_column apply to a Hugging Face dataset object; for hf:PATH "
                                 "put them in the source: hf:PATH?image=COLUMN&label=COLUMN")
            spec = ExtractSpec(source=str(source), **settings)
        else:
            from ..data.python_objects import from_python

            columns = {key: settings.pop(f"{key}_column") for key in ("image", "label") if f"{key}_column" in settings}
            prepared = from_python(source, name=settings.get("name"), unlabeled=settings.get("unlabeled", ()),
                                   columns=columns, allow_layout=settings.get("allow_layout", False),
                                   content_hash=settings.get("content_hash", False))
            kind = prepared.kind.removeprefix("python:")
            spec = ExtractSpec(source=f"python:{kind}:{prepared.name}", **settings)
    elif source is not None or settings:
        raise UsageError("give extract either an ExtractSpec or keyword settings, not both")
    _check_spec(spec)
    group = join_group(spec.device)
    if spec.views and group.world_size > 1:
        group.close()
        raise UsageError("--views runs in one process; extract the views without torchrun (--devices 1)")
    try:
        return _extract(spec, group, progress, prepared)
    finally:
        group.close()


def _extract(spec: ExtractSpec, group: Group, progress: Callable[[int, int], None] | None,
             prepared=None) -> ExtractResult:
    started = time.perf_counter()
    entry = get_backbone(spec.model)
    taps = validate_taps(entry, spec.taps)
    device = group.device
    precision = resolve_precision(spec.precision, device)
    resolve_optimize(spec.optimize, device, precision)  # refuse a bad --optimize before writing anything
    source = prepared if prepared is not None else open_source(
        spec.source, content_hash=spec.content_hash, allow_layout=spec.allow_layout, unlabeled=tuple(spec.unlabeled))
    weights = resolve_weights(entry, spec.weights, seed=spec.seed)
    preprocessing = weights.preprocessing
    if spec.image_size is not None:
        preprocessing = preprocessing.with_image_size(spec.image_size)
    if spec.crop_mode is not None:
        preprocessing = dataclasses.replace(preprocessing, crop_mode=spec.crop_mode)
    draft = spec.draft and isinstance(source, FileSource)
    if draft:
        # libjpeg decodes at the smallest 1/2..1/8 scale whose shorter side still covers the resize.
        source.draft_size = (preprocessing.resize_size, preprocessing.resize_size)
    elif spec.draft:  # the key must not record a decoding that never happened
        log.warning("--draft applies to image files read from a folder, a CSV or a named file layout; %s is read "
                    "through a dataset object, so its images are decoded at full size", spec.source)

    config = {
        "arch": entry.name,
        "weights_sha256": weights.sha256,
        "taps": list(taps),
        "preprocessing": {**preprocessing.to_dict(), **({"jpeg_draft": True} if draft else {}),
                          **({"decode": "torch"} if spec.decode == "torch" else {})},
        "dtype": spec.dtype,
        "precision": precision,
        "source": source.identity(),
        "fingerprint": "content" if spec.content_hash else "stat",
    }
    entry_hash = entry_id(config)
    key = content_key(entry_hash, [s.fingerprint for s in source.samples])
    root = Path(spec.root) if spec.root else default_root()
    path = root / entry_dir_name(spec.name or source.name, entry.name, entry_hash)
    try:
        path.joinpath(SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise storage_error(error, path, "the cache entry") from None

    # Only rank 0 (the only process outside torchrun) locks, cleans up, plans and writes the manifest.
    with contextlib.ExitStack() as lock:
        if group.leader:
            lock.enter_context(entry_lock(path, spec.lock_timeout))
            # again: a run that read no image, holding the lock before us, removed the entry
            path.joinpath(SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        fault_point("after_lock")
        previous = read_manifest(path) if group.leader and (path / MANIFEST).exists() else None
        damaged_checkpoint = bool(previous) and group.leader and not _checkpoint_intact(root, previous)
        hit = (previous and previous.get("complete") and previous["key"] == key and _holds_rows(previous)
               and _shards_present(path, previous) and not damaged_checkpoint)
        plan = None if hit or not group.leader else make_plan(path, previous, source, spec.shard_size,
                                                              entry_id=entry_hash)
        hit, plan = group.share_plan(key, previous if hit else None, plan, source)
        built: list = []

        def model_factory() -> StagedBackbone:  # built once, for the plain rows and the views
            if not built:
                network = build_network(entry, weights.state_dict)
                model = staged_backbone(entry, network).eval().to(device, memory_format=torch.channels_last)
                # Decided by the dataset's size, not by what is left to compute, so a resumed run
                # builds the same graph as an uninterrupted one (bitwise-identical features).
                optimize = resolve_optimize(spec.optimize, device, precision, images=len(source.samples))
                built.append(optimize_backbone(model, taps, mode=optimize, batch_size=spec.batch_size,
                                               image_size=preprocessing.crop_size, device=device))
            return built[0]

        workers = default_workers() if spec.workers is None else spec.workers
        if hit:
            log.info("cache hit: %s", path)
            result = ExtractResult(path, key, True, hit["splits"], 0, hit["skipped"], time.perf_counter() - started,
                                   list(source.unlabeled_splits))
            lock.close()  # views take the lock themselves
            return _with_views(result, hit, spec, source, model_factory, taps, device, precision, preprocessing,
                               workers, progress)
        pipeline = None
        try:  # from here a failure leaves the entry as it found it (the copy scan can take a while)
            copies = _copies(source, plan, previous) if group.leader else []
            manifest = new_manifest(
                tool_version=__version__, entry_id=entry_hash, key=key, config=config, weights_spec=spec.weights,
                weights_description=weights.description, weights_sha256=weights.sha256,
                spec=dataclasses.asdict(spec), classes=source.classes, dtype=spec.dtype,
                taps={t: tap_shape(entry, t, preprocessing.crop_size) for t in taps},
                created=(previous or {}).get("created"), unlabeled_splits=list(source.unlabeled_splits),
                fingerprints="content" if spec.content_hash else source.fingerprint_kind, class_ids=source.class_ids,
                copies=copies)
            if group.leader:
                store_weights(root / WEIGHTS_DIR, entry.name, weights)
            plan = group.assign(plan)  # this rank's shards: all of them outside torchrun
            pipeline = ShardPipeline(path, manifest, plan, spec, publish=group.leader)
            pipeline.carry_over()
            computed = 0
            if plan.shards:
                computed = _compute(model_factory(), source, plan, pipeline, spec, taps, device, precision,
                                    preprocessing, workers, progress)
            computed = group.collect(pipeline, computed)  # waits for every rank; rank 0 lists their shards
            if group.share(group.leader and not _holds_rows(pipeline.manifest)):
                raise _nothing_readable(spec.source, pipeline.manifest["skipped"])
            final = group.share(pipeline.finish())
        except BaseException:
            if group.leader:
                _leave_as_found(path, previous, pipeline and pipeline.manifest)
            raise
        if group.leader:
            pipeline.remove_unreferenced()
    notes = [f"restored the backbone checkpoint {root / WEIGHTS_DIR / weights_file(weights.sha256)} "
             "(it was missing or damaged)"] if damaged_checkpoint else []
    result = ExtractResult(path, key, False, final["splits"], computed, final["skipped"], time.perf_counter() - started,
                           list(source.unlabeled_splits), notes)
    return _with_views(result, final, spec, source, model_factory, taps, device, precision, preprocessing, workers,
                       progress)


def _copies(source, plan, previous: dict | None) -> list[dict]:
    """The manifest's `copies`: byte-identical images across splits or classes, read again only
    where a group of alike files holds a row this run computes; an earlier run's still hold."""
    earlier = (previous or {}).get("copies") or []
    fresh = {sample.fingerprint for sample in plan.to_compute}
    changed = {(s.split, s.path) for s in source.samples if s.fingerprint in fresh}
    listed = {(s.split, s.path) for s in source.samples}
    for record in earlier:  # a pair that lost one image: its other may still copy a third
        pair = {(record["split"], record["path"]), (record["original_split"], record["original"])}
        if pair & changed or not pair <= listed:
            changed |= pair & listed

    def new(sample) -> bool:
        return (sample.split, sample.path) in changed

    found = copy_records(find_copies(source.samples, source.content, new), source.classes)
    return merge_records(earlier, found, source.samples, new)


def _with_views(result: ExtractResult, manifest: dict, spec: ExtractSpec, source, model_factory, taps, device,
                precision, preprocessing, workers, progress) -> ExtractResult:
    """The plain entry is complete: say what it cannot teach, then add the views asked for."""
    result.warnings = untaught_classes_of(open_cache(result.path)) + copy_warnings(manifest.get("copies") or [])
    if not spec.views:
        return result
    from .views import extend_views

    result.views = extend_views(path=result.path, manifest=manifest, source=source, spec=spec,
                                model_factory=model_factory, taps=taps, device=device, precision=precision,
                                preprocessing=preprocessing, workers=workers, progress=progress)
    return result


def _holds_rows(manifest: dict) -> bool:
    return any(record["rows"] for record in manifest.get("shards", []))


def _nothing_readable(source: str, skipped: list[dict]) -> SourceError:
    shown = "; ".join(f"{printable_path(s['path'])}: {s['reason']}" for s in skipped[:3])  # names may not be UTF-8
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return SourceError(f"no image of {source} could be read ({len(skipped)} tried: {shown}{more}), so nothing was "
                       "cached; check that it is the dataset you meant, and replace or remove the unreadable files")


def _leave_as_found(path: Path, previous: dict | None, manifest: dict | None) -> None:
    """After a failed run that stored no row (`manifest`: the run's own, None before it began):
    the previous manifest back when it listed rows, else no entry at all, so that neither a
    0-row entry nor an empty folder is left. An entry holding rows or a shard file is kept."""
    if manifest is not None and _holds_rows(manifest):
        return  # an ordinary interrupted run: the next one resumes it
    try:
        if previous is not None and _holds_rows(previous):
            if manifest is not None:  # this run rewrote the manifest
                write_manifest(path, previous)
        elif not any((path / SHARDS_DIR).glob("*.h5")):
            (path / MANIFEST).unlink(missing_ok=True)
            shards = path / SHARDS_DIR
            if shards.is_dir():
                for leftover in shards.iterdir():  # temporaries of this run's own writer
                    leftover.unlink()
                shards.rmdir()
            if {p.name for p in path.iterdir()} <= {LOCK}:  # heads/, report/ ... of an earlier entry stay
                shutil.rmtree(path)
    except (OSError, FeatureCacheError) as error:
        log.warning("could not leave %s as it was: %s", path, error)


def _checkpoint_intact(root: Path, manifest: dict) -> bool:
    """Whether `_weights/<sha>.safetensors` is there and hashes to its name: no cache hit otherwise,
    so the run goes on and rewrites it from the resolved weights."""
    try:
        read_checkpoint(root / WEIGHTS_DIR, manifest["weights"]["sha256"])
    except (CacheNotFoundError, CorruptCacheError) as error:
        log.warning("%s", error)
        return False
    return True


def _shards_present(path: Path, manifest: dict) -> bool:
    return shard_size_problem(path, manifest) is None


def _compute(model: StagedBackbone, source, plan: Plan, pipeline: ShardPipeline, spec: ExtractSpec,
             taps, device, precision, preprocessing, workers: int, progress) -> int:
    samples = plan.to_compute
    # Batches never straddle a shard, so a resumed run batches images exactly as an
    # uninterrupted one would, and gets bitwise-identical features.
    batches = [list(range(start, min(start + spec.batch_size, shard.stop)))
               for shard in plan.shards for start in range(shard.start, shard.stop, spec.batch_size)]
    done, consecutive_failures, computed = 0, 0, 0
    total = sum(shard.stop - shard.start for shard in plan.shards)  # this rank's part under torchrun
    pipeline.start()
    try:
        for batch in run_backbone(model, source, samples, preprocessing=preprocessing, taps=taps,
                                  device=device, precision=precision, dtype=spec.dtype,
                                  batches=batches, num_workers=workers, decode=spec.decode):
            if batch.failures and spec.on_error == "fail":
                position, reason = batch.failures[0]
                raise UnreadableImageError(f"cannot read {samples[position].path}: {reason} "
                                           "(use --on-error skip to skip unreadable images)")
            failed = dict(batch.failures)
            for position in sorted([*batch.positions, *failed]):
                consecutive_failures = consecutive_failures + 1 if position in failed else 0
                if consecutive_failures >= spec.max_consecutive_failures:
                    raise ExtractionError(
                        f"{consecutive_failures} images in a row could not be read (last: "
                        f"{samples[position].path}: {failed[position]}); check the dataset")
            pipeline.put(batch)
            computed += len(batch.positions)
            done += len(batch.positions) + len(batch.failures)
            if progress:
                progress(done, total)
        pipeline.close()
    except BaseException:
        pipeline.abort()
        raise
    return computed
