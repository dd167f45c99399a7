"""`--decode torch`: torchvision.io decoding and tensor resizing, close to PIL's, in the key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featurecache import extract, open_cache
from featurecache.backbones.registry import Preprocessing
from featurecache.errors import UsageError
from featurecache.backbones.preprocess import prepare_image
from featurecache.backbones.tensor_decode import decode_batch, decode_one, read_encoded, resize_crop
from helpers import write_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Features of the same images through the two decoders: 96 px ResNet18, random weights, fp32.
FEATURE_TOLERANCE = 0.02  # relative L2 difference per image, measured ~0.002-0.01
PIXEL_TOLERANCE = 3  # mean absolute difference of the uint8 crops, measured ~0.3-1


def _photo(path, seed, size=(120, 90), fmt="JPEG", mode="RGB"):
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([127 + 100 * np.sin(xs / (7 + seed + c)) * np.cos(ys / (5 + c)) for c in range(3)], -1)
    pixels += rng.normal(0, 4, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    for i in range(4):
        _photo(root / "train" / ("a" if i % 2 else "b") / f"{i}.jpg", i)
        _photo(root / "val" / ("a" if i % 2 else "b") / f"{i}.png", 10 + i, fmt="PNG", size=(70, 100))
    _photo(root / "train" / "a" / "gray.jpg", 20, mode="L")
    _photo(root / "train" / "b" / "palette.png", 21, fmt="PNG", mode="P")  # PIL decodes it, tensors resize it
    return root


def test_tensor_crops_are_close_to_pils(photos):
    preprocessing = Preprocessing(resize_size=64, crop_size=56)
    for path in sorted(photos.rglob("*.*")):
        ours = resize_crop(decode_one(read_encoded(path)), preprocessing)
        with Image.open(path) as image:
            reference = prepare_image(image.convert("RGB"), preprocessing)
        assert ours.shape == reference.shape == (3, 56, 56) and ours.dtype == torch.uint8
        assert (ours.float() - reference.float()).abs().mean() < PIXEL_TOLERANCE, path


def test_unreadable_files_are_reported_not_raised(tmp_path):
    from featurecache.data.images import ImageDecodeError

    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError):
        read_encoded(garbage)
    good = _photo(tmp_path / "good.jpg", 1)
    broken = tmp_path / "broken.jpg"  # a valid header, then the scan data cut short
    data = good.read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    items = [read_encoded(good), read_encoded(broken)]
    results = decode_batch(items, torch.device("cpu"))
    assert isinstance(results[0], torch.Tensor) and results[0].shape == (3, 90, 120)
    assert isinstance(results[1], ImageDecodeError) or results[1].shape == (3, 90, 120)  # libjpeg may pad


def test_extract_with_torch_decode_is_close_to_pil_and_keyed_apart(photos, tiny_spec):
    pil = extract(tiny_spec(photos, image_size=96))
    torch_decoded = extract(tiny_spec(photos, image_size=96, decode="torch"))
    assert pil.path != torch_decoded.path and pil.key != torch_decoded.key
    for split in ("train", "val"):
        a, b = open_cache(pil.path).features(split), open_cache(torch_decoded.path).features(split)
        assert a.shape == b.shape
        relative = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
        assert relative.max() < FEATURE_TOLERANCE, relative
    manifest = open_cache(torch_decoded.path).manifest
    assert manifest["config"]["preprocessing"]["decode"] == "torch"
    assert "decode" not in open_cache(pil.path).manifest["config"]["preprocessing"]  # old keys unchanged


def test_torch_decode_with_workers_and_array_sources(photos, tiny_spec):
    with_workers = extract(tiny_spec(photos, decode="torch", workers=1))
    inline = extract(tiny_spec(photos, decode="torch", workers=0, root=str(photos.parent / "other")))
    np.testing.assert_array_equal(open_cache(with_workers.path).features("train"),
                                  open_cache(inline.path).features("train"))
    from featurecache.extract.engine import _DecodeDataset
    from featurecache.data.sources import ArraySource

    arrays = ArraySource("arrays", "memory", ["x", "y"], np.random.default_rng(0).integers(0, 255, (2, 20, 30, 3)),
                         np.array([0, 1]), ["train", "train"])
    dataset = _DecodeDataset(arrays, arrays.samples, Preprocessing(resize_size=40, crop_size=32), decode="torch")
    position, crop, reason = dataset[1]
    assert position == 1 and reason == "" and crop.shape == (3, 32, 32)


def test_bad_decode_values_are_refused(photos, tiny_spec):
    with pytest.raises(UsageError, match="--decode"):
        extract(tiny_spec(photos, decode="nvjpeg"))
    with pytest.raises(UsageError, match="--draft"):
        extract(tiny_spec(photos, decode="torch", draft=True))


def test_deferred_decoding_path_used_on_gpus_runs_on_cpu_tensors(photos, tmp_path):
    """On a GPU, workers hand over bytes and the device decodes the batch; run it on the CPU."""
    from featurecache.extract.engine import _collate, _decode_on_device, _DecodeDataset
    from featurecache.data.sources import open_source

    broken = photos / "train" / "a" / "zz-broken.jpg"
    data = (photos / "train" / "a" / "1.jpg").read_bytes()
    broken.write_bytes(data[:200])
    source = open_source(str(photos))
    preprocessing = Preprocessing(resize_size=64, crop_size=56)
    deferred = _DecodeDataset(source, source.samples, preprocessing, decode="torch", defer=True)
    inline = _DecodeDataset(source, source.samples, preprocessing, decode="torch")
    positions, items, failures = _collate([deferred[i] for i in range(len(source.samples))])
    kept, images, failures = _decode_on_device(positions, items, failures, preprocessing, torch.device("cpu"))
    by_position = dict(zip(kept, images))
    for i in range(len(source.samples)):
        position, crop, reason = inline[i]
        if crop is None:
            assert any(p == i for p, _ in failures)
        else:
            assert torch.equal(by_position[i], crop)
    assert len(kept) + len(failures) == len(source.samples)
