"""The extract stage: correctness against torchvision, cache hits, incremental updates, resume."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file

from featurecache import extract, open_cache
from featurecache.backbones.registry import StagedBackbone, get_backbone
from featurecache.errors import ExtractionError, UnreadableImageError
from featurecache.backbones.preprocess import normalize_batch, prepare_image
from featurecache.errors import CorruptCacheError
from featurecache.extract.writer import ShardPipeline
from featurecache.cache.shards import ShardRows, ShardWriter, features_checksum, read_rows
from featurecache.data.sources import open_source

from helpers import flip_feature_byte, replace_spec, write_image


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reference_features(result, source_path, model_name, split):
    """Plain torchvision forward (fc removed, NCHW, fp32) on our preprocessed tensors."""
    manifest = open_cache(result.path).manifest
    state = load_file(str(result.path.parent / "_weights" / f"{manifest['weights']['sha256']}.safetensors"))
    network = getattr(torchvision.models, model_name)()
    network.load_state_dict(state, strict=False)
    network.fc = torch.nn.Identity()
    network.eval()
    from featurecache.backbones.registry import Preprocessing

    pre = Preprocessing.from_dict(manifest["config"]["preprocessing"])
    source = open_source(str(source_path))
    by_path = {s.path: s for s in source.samples}
    paths = open_cache(result.path).paths(split)
    batch = torch.stack([prepare_image(source.load(by_path[p]), pre) for p in paths])
    with torch.no_grad():
        return network(normalize_batch(batch, pre, channels_last=False)).numpy()


def test_features_match_plain_torchvision_resnet50(image_folder, tiny_spec):
    # fp32 forward, fp32 storage: only channels_last summation order differs.
    result = extract(tiny_spec(image_folder, model="resnet50", image_size=64))
    cached = open_cache(result.path).features("train")
    reference = _reference_features(result, image_folder, "resnet50", "train")
    np.testing.assert_allclose(cached, reference, rtol=1e-4, atol=1e-4)


def test_float16_storage_within_half_precision(image_folder, tiny_spec):
    spec = tiny_spec(image_folder, dtype="float16")
    cached = open_cache(extract(spec).path).features("val").astype(np.float32)
    reference = _reference_features(extract(spec), image_folder, "resnet18", "val")
    np.testing.assert_allclose(cached, reference, rtol=2e-3, atol=1e-3)


def test_bf16_forward_within_stated_tolerance(image_folder, tiny_spec):
    spec = tiny_spec(image_folder, precision="bf16")
    cached = open_cache(extract(spec).path).features("val")
    reference = _reference_features(extract(spec), image_folder, "resnet18", "val")
    # bf16 keeps 8 bits of mantissa: about 1% relative error per feature.
    relative = np.linalg.norm(cached - reference) / np.linalg.norm(reference)
    assert relative < 0.03, relative


def test_cache_hit_runs_no_backbone(image_folder, tiny_spec, monkeypatch):
    first = extract(tiny_spec(image_folder))
    assert not first.cache_hit and first.computed == 16

    def forbidden(*args, **kwargs):
        raise AssertionError("backbone forward on a cache hit")

    monkeypatch.setattr(StagedBackbone, "forward", forbidden)
    second = extract(tiny_spec(image_folder))
    assert second.cache_hit and second.computed == 0 and second.path == first.path
    assert second.splits == {"train": 10, "val": 6}


def test_incremental_add_and_remove(image_folder, tiny_spec):
    spec = tiny_spec(image_folder)
    first = extract(spec)
    write_image(image_folder / "train" / "ants" / "new.png", seed=999)
    added = extract(spec)
    assert added.path == first.path and added.computed == 1 and added.key != first.key
    assert added.splits["train"] == 11
    assert "train/ants/new.png" in open_cache(added.path).paths("train")

    (image_folder / "train" / "bees" / "bees_0.png").unlink()
    removed = extract(spec)
    assert removed.computed == 0 and removed.splits["train"] == 10
    cache = open_cache(removed.path)
    assert "train/bees/bees_0.png" not in cache.paths("train")
    # Reused rows match a fresh extraction (the new image was batched differently).
    fresh = extract(replace_spec(spec, root=str(image_folder.parent / "fresh")))
    fresh_cache = open_cache(fresh.path)
    order = {p: i for i, p in enumerate(fresh_cache.paths("train"))}
    rows = [order[p] for p in cache.paths("train")]
    np.testing.assert_allclose(cache.features("train"), fresh_cache.features("train")[rows], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(cache.labels("train"), fresh_cache.labels("train")[rows])
    assert len(list((removed.path / "shards").glob("*.h5"))) == len(cache.manifest["shards"])


def test_resume_after_crash_between_shards(image_folder, tiny_spec, monkeypatch):
    spec = tiny_spec(image_folder)
    commits = {"n": 0}
    original = ShardPipeline._commit_shard

    def crash_after_two(self, *args, **kwargs):
        if commits["n"] == 2:
            raise KeyboardInterrupt  # the session dies between shards
        commits["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShardPipeline, "_commit_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract(spec)
    monkeypatch.setattr(ShardPipeline, "_commit_shard", original)
    resumed = extract(spec)
    assert resumed.computed == 16 - 8  # two shards of four images survived
    assert not [f for f in (resumed.path / "shards").iterdir() if ".tmp-" in f.name]
    uninterrupted = extract(replace_spec(spec, root=str(image_folder.parent / "clean")))
    for split in ("train", "val"):
        np.testing.assert_array_equal(open_cache(resumed.path).features(split),
                                      open_cache(uninterrupted.path).features(split))
        assert open_cache(resumed.path).paths(split) == open_cache(uninterrupted.path).paths(split)


def test_key_changes_with_weights_preprocessing_and_taps(image_folder, tiny_spec):
    base = extract(tiny_spec(image_folder))
    variants = [tiny_spec(image_folder, seed=1), tiny_spec(image_folder, image_size=48),
                tiny_spec(image_folder, taps=("pool", "layer3")), tiny_spec(image_folder, dtype="float16")]
    paths = {base.path} | {extract(v).path for v in variants}
    keys = {base.key} | {extract(v).key for v in variants}
    assert len(paths) == 5 and len(keys) == 5


def test_several_taps_in_one_pass(image_folder, tiny_spec):
    cache = open_cache(extract(tiny_spec(image_folder, taps=("layer3", "layer4", "pool"))).path)
    assert cache.features("train", "layer3").shape == (10, 256, 2, 2)
    assert cache.features("train", "layer4").shape == (10, 512, 1, 1)
    pooled = cache.features("train", "layer4").mean(axis=(2, 3))
    np.testing.assert_allclose(pooled, cache.features("train", "pool"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compression", [None, "lzf"])
def test_row_reader_reads_any_rows_in_any_order_and_checks_shards_first(image_folder, tiny_spec, compression):
    result = extract(tiny_spec(image_folder, taps=("pool", "layer3"), compression=compression))
    cache = open_cache(result.path)
    everything = cache.features("train", "layer3")  # 10 rows over 3 shards of 4
    reader = cache.row_reader("train", "layer3")
    positions = [9, 0, 5, 4, 3, 8]
    np.testing.assert_array_equal(reader.read(positions), everything[positions])
    assert len(reader) == 10 and reader.read([]).shape == (0, *everything.shape[1:])
    with pytest.raises(IndexError):
        reader.read([10])
    flip_feature_byte(cache.path / cache.manifest["shards"][1]["file"], "layer3", at=7)
    with pytest.raises(CorruptCacheError, match="run featurecache verify"):
        cache.row_reader("train", "layer3")


def test_shard_readable_with_plain_h5py(image_folder, tiny_spec):
    result = extract(tiny_spec(image_folder))
    shard = sorted((result.path / "shards").glob("train-*.h5"))[0]
    with h5py.File(shard, "r") as handle:
        assert handle["features/pool"].shape == (4, 512)
        assert handle["labels"].dtype == np.int64 and handle["index"].dtype == np.int64
        assert handle["paths"][0].decode().startswith("train/")
        assert handle["features/pool"].chunks is None  # contiguous: read at np.load speed
        assert handle["features/pool"].attrs["checksum"] == features_checksum(handle["features/pool"][:])
        assert handle["labels"].fletcher32


@pytest.mark.parametrize("compression", [None, "lzf"])
def test_a_shard_short_of_its_capacity_holds_exactly_its_rows_and_detects_flipped_bytes(tmp_path, compression):
    values = np.random.default_rng(0).random((4, 8, 3)).astype(np.float32)
    writer = ShardWriter(tmp_path / "train-00000.h5", tap_shapes={"pool": (8, 3)}, dtype="float16", attrs={},
                         capacity=6, compression=compression)  # 2 of 6 planned images failed
    for rows in (slice(0, 3), slice(3, 4)):
        n = len(values[rows])
        writer.append(ShardRows({"pool": values[rows]}, np.zeros(n, np.int64), np.arange(n),
                                [f"p/{i}" for i in range(n)], [f"{i:032d}" for i in range(n)]))
    writer.commit()
    shard = tmp_path / "train-00000.h5"
    got = read_rows(shard, 4, {"pool": (8, 3)})
    np.testing.assert_array_equal(got.features["pool"], values.astype(np.float16))
    with h5py.File(shard, "r") as handle:
        dataset = handle["features/pool"]
        assert dataset.shape == (4, 8, 3)
        assert (dataset.chunks is None) == (compression is None) and dataset.fletcher32 == (compression is not None)
    flip_feature_byte(shard, "pool", at=5, mask=0x10)
    with pytest.raises(CorruptCacheError, match="run featurecache verify"):
        read_rows(shard, 4, {"pool": (8, 3)})


def test_unreadable_images_are_skipped_and_listed(image_folder, tiny_spec):
    (image_folder / "train" / "ants" / "broken.jpg").write_bytes(b"not an image at all")
    (image_folder / "train" / "ants" / "empty.png").write_bytes(b"")
    result = extract(tiny_spec(image_folder))
    reasons = {s["path"]: s["reason"] for s in result.skipped}
    assert set(reasons) == {"train/ants/broken.jpg", "train/ants/empty.png"}
    assert result.splits["train"] + len(result.skipped) == 12
    assert extract(tiny_spec(image_folder)).cache_hit  # skipped files are not retried endlessly
    with pytest.raises(UnreadableImageError, match="broken.jpg|empty.png"):
        extract(tiny_spec(image_folder, on_error="fail", root=str(image_folder.parent / "other")))


def test_too_many_consecutive_failures_abort(tmp_path, tiny_spec):
    for i in range(6):
        (tmp_path / "bad" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "bad" / "a" / f"{i}.jpg").write_bytes(b"junk")
    with pytest.raises(ExtractionError, match="in a row"):
        extract(tiny_spec(tmp_path / "bad", max_consecutive_failures=5, allow_layout=True))  # one class
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["_weights"]  # no entry of 0 rows is left


def test_dataloader_workers_give_the_same_features(image_folder, tiny_spec):
    in_process = open_cache(extract(tiny_spec(image_folder)).path).features("train")
    spec = tiny_spec(image_folder, workers=2, root=str(image_folder.parent / "workers"))
    np.testing.assert_array_equal(open_cache(extract(spec).path).features("train"), in_process)


def test_small_images_are_upsampled_not_padded(tmp_path):
    from featurecache.backbones.registry import IMAGENET_PREPROCESSING
    from PIL import Image

    tensor = prepare_image(Image.new("RGB", (32, 32), (200, 10, 10)), IMAGENET_PREPROCESSING)
    assert tensor.shape == (3, 224, 224)
    assert int(tensor.min()) > 0  # no zero padding anywhere


def test_registry_refuses_duplicates():
    from featurecache.backbones.registry import register_backbone

    with pytest.raises(ValueError):
        register_backbone(get_backbone("resnet50"))


def test_no_temp_files_left_and_manifest_parses(image_folder, tiny_spec):
    import json

    result = extract(tiny_spec(image_folder))
    leftovers = [f for f in result.path.rglob("*") if ".tmp-" in f.name]
    assert leftovers == []
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["complete"] and sum(s["rows"] for s in manifest["shards"]) == 16
    assert os.path.exists(result.path.parent / "_weights" / f"{manifest['weights']['sha256']}.safetensors")
