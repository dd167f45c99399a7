"""Hostile inputs through a real extract run: every file becomes a correct RGB row or is
skipped with its reason in the manifest, rows + skipped = files seen, and no row ever
holds another file's features. Also: too many failures in a row, and a malicious
pickle passed as --weights whatever the environment says."""

from __future__ import annotations

import os
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import featurecache.data.images as images
from featurecache import extract, open_cache
from featurecache.backbones.registry import Preprocessing, StagedBackbone, build_network, get_backbone
from featurecache.cli import app
from featurecache.errors import ExtractionError
from featurecache.backbones.preprocess import normalize_batch, prepare_image
from featurecache.data.sources import open_source

from processes import tiny_backbone


def _pixels(seed: int, size: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _hostile_folder(folder) -> tuple[dict[str, str], list[str]]:
    """Writes the files; returns {skipped name: reason fragment} and the names that must be rows."""
    folder.mkdir(parents=True)
    rgb = lambda seed: Image.fromarray(_pixels(seed))  # noqa: E731
    rows = []

    def save(name, image, **options):
        image.save(folder / name, **options)
        rows.append(name)

    for i in range(3):
        save(f"good_{i}.png", rgb(i))
    save("sixteen_bit.png", Image.fromarray((_pixels(10)[:, :, 0].astype(np.uint16) * 257)))
    save("cmyk.jpg", rgb(11).convert("CMYK"))
    rgba = np.dstack([_pixels(12), _pixels(13)[:, :, :1]])
    save("rgba.png", Image.fromarray(rgba, "RGBA"))
    save("la.png", Image.fromarray(rgba[:, :, 2:], "LA"))
    palette = rgb(14).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save("palette_transparent.png", palette, transparency=3)
    frames = [rgb(15), rgb(16)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=50)
    for orientation in range(2, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        save(f"exif_{orientation}.jpg", rgb(20 + orientation), exif=exif.tobytes())
    save("ünïcödé name with spaces.png", rgb(30))
    save("unreadable.png", rgb(31))  # made unreadable below

    skipped = {"truncated.jpg": "truncated", "zero_bytes.jpg": "empty file",
               "text.jpg": "not an image", "bomb.png": "too large", "loop.jpg": "symlink loop",
               "unreadable.png": "permission denied"}
    rgb(32).save(folder / "truncated.jpg")
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zero_bytes.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a JPEG\n")
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                                      + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.chmod(folder / "unreadable.png", 0)
    rows.remove("unreadable.png")
    return skipped, rows


@pytest.fixture
def tiny():
    with tiny_backbone():
        yield


def test_hostile_files_become_rows_or_reasoned_skips(tmp_path, tiny_spec, tiny, monkeypatch):
    skipped, rows = _hostile_folder(tmp_path / "hostile" / "train" / "things")
    real_open = open

    def open_as_unprivileged(path, *args, **kwargs):  # root reads mode-000 files; a user cannot
        if os.fspath(path).endswith("unreadable.png"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(images, "open", open_as_unprivileged, raising=False)
    spec = tiny_spec(tmp_path / "hostile", model="tiny", image_size=32, allow_layout=True)  # one class
    result = extract(spec)
    seen = len(open_source(spec.source, allow_layout=True).samples)
    assert seen == len(rows) + len(skipped) == 23
    assert result.splits["train"] + len(result.skipped) == seen
    reasons = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in result.skipped}
    assert set(reasons) == set(skipped)
    for name, fragment in skipped.items():
        assert fragment in reasons[name], (name, reasons[name])
    assert open_cache(result.path).manifest["skipped"] == result.skipped  # recorded in the manifest

    # Never another image: each row equals its own file run through the network alone.
    cache = open_cache(result.path)
    manifest = cache.manifest
    state = load_file(str(result.path.parent / "_weights" / f"{manifest['weights']['sha256']}.safetensors"))
    model = StagedBackbone(build_network(get_backbone("tiny"), state)).eval()
    pre = Preprocessing.from_dict(manifest["config"]["preprocessing"])
    paths = cache.paths("train")
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == sorted(rows)
    batch = torch.stack([prepare_image(images.load_rgb(tmp_path / "hostile" / p), pre) for p in paths])
    with torch.inference_mode():
        alone = torch.cat([model(normalize_batch(batch[i : i + 1], pre), ["pool"])["pool"] for i in range(len(paths))])
    np.testing.assert_allclose(cache.features("train"), alone.numpy(), rtol=1e-4, atol=1e-5)
    assert len({f.tobytes() for f in cache.features("train")}) == len(rows)  # all distinct


def test_fifty_failures_in_a_row_abort_without_empty_shards(tmp_path, tiny_spec, tiny):
    folder = tmp_path / "junk" / "train" / "a"
    folder.mkdir(parents=True)
    for i in range(60):
        (folder / f"{i:02d}.jpg").write_bytes(b"junk")
    with pytest.raises(ExtractionError, match="50 images in a row could not be read"):
        extract(tiny_spec(tmp_path / "junk", model="tiny", allow_layout=True))  # one class
    assert not list((tmp_path / "cache").rglob("*.h5"))


@pytest.mark.parametrize("env", [{}, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
                                 {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "0"}])
def test_malicious_pickle_never_runs_whatever_the_environment(env, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    checkpoint = tmp_path / "x.pt"
    torch.save({"conv1.weight": Exploit()}, checkpoint, _use_new_zipfile_serialization=True)
    with open(tmp_path / "legacy.pt", "wb") as handle:
        pickle.dump({"conv1.weight": Exploit()}, handle)
    for path in (checkpoint, tmp_path / "legacy.pt"):
        result = CliRunner().invoke(app, ["extract", "digits", "--weights", str(path), "--root", str(tmp_path / "c")])
        assert result.exit_code == 2 and "error:" in result.stderr, result.output
        assert not marker.exists()
