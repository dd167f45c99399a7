"""The cache key: every field that changes the numbers makes a new entry; changed files are recomputed.

One test per key field: extracting the same source twice into one cache root with that
field changed gives two entries (and the second run computes every image); with no
field changed, or only a field that does not change the numbers, one entry and a hit.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from featurecache import extract, open_cache
from featurecache.backbones.registry import get_backbone
from featurecache.backbones.weights import PREPROCESSING_METADATA

from helpers import replace_spec, write_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IMAGES = 16  # the image_folder fixture: 2 splits x 2 classes x (5 + 3)


def _entries(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))


def _extract_twice(first, second):
    """Both specs into one root; (first result, second result, entry folder names)."""
    a, b = extract(first), extract(second)
    return a, b, _entries(a.path.parent)


def _assert_two_entries(first, second):
    a, b, entries = _extract_twice(first, second)
    assert len(entries) == 2 and a.path != b.path and a.key != b.key, entries
    assert not b.cache_hit and b.computed == IMAGES
    return a, b


def test_same_spec_is_one_entry_and_a_hit(image_folder, tiny_spec):
    a, b, entries = _extract_twice(tiny_spec(image_folder), tiny_spec(image_folder))
    assert entries == [a.path.name] and b.cache_hit and b.computed == 0 and a.key == b.key


def test_settings_that_do_not_change_the_numbers_share_the_entry(image_folder, tiny_spec):
    # Batching, sharding and workers change how the work is done, not the features.
    a, b, entries = _extract_twice(tiny_spec(image_folder),
                                   tiny_spec(image_folder, batch_size=3, shard_size=5, lock_timeout=5.0))
    assert entries == [a.path.name] and b.cache_hit and a.key == b.key


def test_key_field_weights(image_folder, tiny_spec):
    a, b = _assert_two_entries(tiny_spec(image_folder, seed=0), tiny_spec(image_folder, seed=1))
    assert open_cache(a.path).manifest["weights"]["sha256"] != open_cache(b.path).manifest["weights"]["sha256"]


def test_key_field_model(image_folder, tiny_spec, tmp_path):
    # Two architectures that load the very same checkpoint (the second has no max-pool, which
    # has no parameters): only the architecture tells their features apart, not the weights' hash.
    from torch import nn

    from featurecache.backbones.registry import BackboneEntry, register_backbone, unregister_backbone
    from processes import TINY, TinyResNet

    class NoMaxPool(TinyResNet):
        def __init__(self) -> None:
            super().__init__()
            self.maxpool = nn.Identity()

    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in TinyResNet().state_dict().items()}, str(checkpoint))
    register_backbone(TINY)
    register_backbone(BackboneEntry(name="tiny-no-maxpool", build=NoMaxPool, tap_channels=TINY.tap_channels,
                                    downsampling=16))
    try:
        a, b = _assert_two_entries(tiny_spec(image_folder, model="tiny", weights=str(checkpoint)),
                                   tiny_spec(image_folder, model="tiny-no-maxpool", weights=str(checkpoint)))
    finally:
        unregister_backbone("tiny")
        unregister_backbone("tiny-no-maxpool")
    assert open_cache(a.path).manifest["weights"]["sha256"] == open_cache(b.path).manifest["weights"]["sha256"]
    assert not np.allclose(open_cache(a.path).features("train"), open_cache(b.path).features("train"))


def test_key_field_tap(image_folder, tiny_spec):
    a, b = _assert_two_entries(tiny_spec(image_folder, taps=("pool",)), tiny_spec(image_folder, taps=("layer4",)))
    assert set(open_cache(b.path).manifest["taps"]) == {"layer4"}


def test_key_field_image_size(image_folder, tiny_spec):
    _assert_two_entries(tiny_spec(image_folder, image_size=32), tiny_spec(image_folder, image_size=48))


def _checkpoint(path, preprocessing: dict):
    """The same resnet18 weights, saved with its own preprocessing in the metadata."""
    torch.manual_seed(0)
    state = get_backbone("resnet18").build().state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={PREPROCESSING_METADATA: json.dumps(preprocessing)})
    return str(path)


@pytest.mark.parametrize("change", [{"resize_size": 40}, {"interpolation": "bicubic"},
                                    {"mean": [0.5, 0.5, 0.5]}])
def test_key_field_resize_and_crop_rule(image_folder, tiny_spec, tmp_path, change):
    base = {"resize_size": 36, "crop_size": 32, "interpolation": "bilinear",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    first = _checkpoint(tmp_path / "a.safetensors", base)
    second = _checkpoint(tmp_path / "b.safetensors", {**base, **change})
    a, b = _assert_two_entries(tiny_spec(image_folder, weights=first, image_size=None),
                               tiny_spec(image_folder, weights=second, image_size=None))
    manifests = open_cache(a.path).manifest, open_cache(b.path).manifest
    assert manifests[0]["weights"]["sha256"] == manifests[1]["weights"]["sha256"]  # only the rule differs
    assert not np.array_equal(open_cache(a.path).features("train"), open_cache(b.path).features("train"))


def test_key_field_forward_precision(image_folder, tiny_spec):
    _assert_two_entries(tiny_spec(image_folder, precision="fp32"), tiny_spec(image_folder, precision="bf16"))


def test_key_field_storage_dtype(image_folder, tiny_spec):
    a, b = _assert_two_entries(tiny_spec(image_folder, dtype="float32"), tiny_spec(image_folder, dtype="float16"))
    assert open_cache(b.path).features("train").dtype == np.float16


def test_key_field_draft(tmp_path, tiny_spec):
    folder = tmp_path / "jpegs"
    for i in range(IMAGES):
        write_image(folder / "train" / ("ants", "bees")[i % 2] / f"{i}.jpg", seed=i, size=160)
    a, b = _assert_two_entries(tiny_spec(folder, draft=False), tiny_spec(folder, draft=True))
    assert not np.array_equal(open_cache(a.path).features("train"), open_cache(b.path).features("train"))


def _rewrite(path, seed: int, *, keep_stat: bool = False) -> None:
    """Write new pixels into `path` (same name); with keep_stat, same size and mtime as before."""
    before = path.stat()
    write_image(path, seed, fmt="BMP")  # BMP: the same byte size for the same dimensions
    if keep_stat:
        assert path.stat().st_size == before.st_size
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _bmp_folder(root):
    for i in range(8):
        write_image(root / "train" / ("ants", "bees")[i % 2] / f"{i}.bmp", seed=i, fmt="BMP")
    return root


def _assert_same_image(row: np.ndarray, fresh: np.ndarray) -> None:
    """The features of the same image (a batch of one against a batch of four: fp32 summation order)."""
    assert np.linalg.norm(row - fresh) / np.linalg.norm(fresh) < 1e-5


def _rows_by_path(cache, split="train") -> dict[str, np.ndarray]:
    return dict(zip(cache.paths(split), cache.features(split)))


@pytest.mark.parametrize("content_hash", [False, True])
def test_a_file_rewritten_in_place_is_recomputed_alone(tmp_path, tiny_spec, content_hash):
    folder = _bmp_folder(tmp_path / "photos")
    spec = tiny_spec(folder, content_hash=content_hash)
    before = _rows_by_path(open_cache(extract(spec).path))
    changed = folder / "train" / "bees" / "3.bmp"
    _rewrite(changed, seed=100)
    after = extract(spec)
    assert not after.cache_hit and after.computed == 1
    rows = _rows_by_path(open_cache(after.path))
    assert not np.allclose(rows["train/bees/3.bmp"], before["train/bees/3.bmp"])
    for path, features in before.items():  # every other row is the one computed before
        if path != "train/bees/3.bmp":
            np.testing.assert_array_equal(rows[path], features)
    fresh = _rows_by_path(open_cache(extract(replace_spec(spec, root=str(tmp_path / "fresh"))).path))
    _assert_same_image(rows["train/bees/3.bmp"], fresh["train/bees/3.bmp"])


def test_content_hash_sees_new_content_behind_the_same_size_and_mtime(tmp_path, tiny_spec):
    folder = _bmp_folder(tmp_path / "photos")
    by_stat, by_content = tiny_spec(folder), tiny_spec(folder, content_hash=True)
    stat_before = _rows_by_path(open_cache(extract(by_stat).path))
    extract(by_content)
    _rewrite(folder / "train" / "ants" / "2.bmp", seed=200, keep_stat=True)
    # Size and mtime fingerprints cannot see this change (that is what --content-hash is for) ...
    assert extract(by_stat).cache_hit
    np.testing.assert_array_equal(_rows_by_path(open_cache(extract(by_stat).path))["train/ants/2.bmp"],
                                  stat_before["train/ants/2.bmp"])
    # ... content fingerprints recompute exactly that file.
    after = extract(by_content)
    assert not after.cache_hit and after.computed == 1
    fresh = _rows_by_path(open_cache(extract(replace_spec(by_content, root=str(tmp_path / "fresh"))).path))
    _assert_same_image(_rows_by_path(open_cache(after.path))["train/ants/2.bmp"], fresh["train/ants/2.bmp"])


@pytest.mark.parametrize("kind", ["torchvision", "paths"])
def test_content_hash_reaches_python_and_torchvision_parsed_sources(tmp_path, kind):
    """--content-hash was dropped for torchvision-parsed datasets (dtd:, caltech101: ...) and Python
    objects: rows were fingerprinted by size and mtime while the manifest said "content"."""
    import torchvision

    from featurecache.data.python_objects import from_python

    folder = _bmp_folder(tmp_path / "photos")
    if kind == "torchvision":
        obj = {"train": torchvision.datasets.ImageFolder(str(folder / "train"))}
    else:
        obj = [(str(p), p.parent.name) for p in sorted((folder / "train").rglob("*.bmp"))]
    by_stat, by_content = from_python(obj), from_python(obj, content_hash=True)
    assert (by_stat.fingerprint_kind, by_content.fingerprint_kind) == ("stat", "content")
    _rewrite(folder / "train" / "ants" / "2.bmp", seed=200, keep_stat=True)
    changed = [a.fingerprint != b.fingerprint for a, b in
               zip(by_content.samples, from_python(obj, content_hash=True).samples)]
    assert changed == [s.path.endswith("ants/2.bmp") for s in by_content.samples] and sum(changed) == 1
    assert [s.fingerprint for s in by_stat.samples] == [s.fingerprint for s in from_python(obj).samples]
