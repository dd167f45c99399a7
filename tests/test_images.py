"""Decoding files and arrays to RGB, and turning every failure into a short reason."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from featurecache.data import images
from featurecache.errors import FeatureCacheError
from featurecache.data.images import ImageDecodeError, decode_array, load_rgb, to_rgb

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def quadrants(width: int = 32, height: int = 16) -> Image.Image:
    """An image whose four quadrants differ, so every flip and rotation is visible."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2, : width // 2] = RED
    pixels[: height // 2, width // 2 :] = GREEN
    pixels[height // 2 :, : width // 2] = BLUE
    pixels[height // 2 :, width // 2 :] = YELLOW
    return Image.fromarray(pixels)


def smooth(width: int, height: int) -> Image.Image:
    """A photo-like image: gradients and a few soft shapes."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 255 * x / width
    green = 255 * y / height
    blue = 127 + 127 * np.sin(x / 37.0) * np.cos(y / 23.0)
    return Image.fromarray(np.stack([red, green, blue], axis=-1).astype(np.uint8))


def save(image: Image.Image, path, **options) -> str:
    image.save(path, **options)
    return str(path)


def reason_of(path, **options) -> str:
    with pytest.raises(ImageDecodeError) as caught:
        load_rgb(path, **options)
    assert caught.value.path == os.fspath(path)
    return caught.value.reason


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# --- failures -------------------------------------------------------------------


def test_error_is_a_featurecache_error_with_path_and_reason(tmp_path):
    error = ImageDecodeError("empty file", tmp_path / "a.jpg")
    assert isinstance(error, FeatureCacheError)
    assert error.reason == "empty file"
    assert str(error) == f"{tmp_path / 'a.jpg'}: empty file"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.path, str(copy)) == (error.reason, error.path, str(error))


def test_truncated_jpeg(tmp_path):
    buffer = io.BytesIO()
    smooth(64, 64).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert reason_of(path) == "truncated image"


def test_truncated_png(tmp_path):
    buffer = io.BytesIO()
    smooth(64, 64).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert reason_of(path) == "truncated image"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert reason_of(path) == "empty file"


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n")
    assert reason_of(path) == "not an image (cannot identify format)"


def test_png_header_claiming_huge_size_is_refused_before_decoding(tmp_path):
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    reason = reason_of(path)
    assert reason.startswith("too large: 10000000000 pixels exceeds limit of"), reason
    assert reason_of(path, max_pixels=1000).startswith("too large"), reason


def test_max_pixels_on_a_normal_image(tmp_path):
    path = save(quadrants(32, 16), tmp_path / "q.png")
    assert reason_of(path, max_pixels=511) == "too large: 32x16 pixels exceeds limit of 511"
    assert load_rgb(path, max_pixels=512).size == (32, 16)


def test_max_pixels_decides_between_pillows_soft_and_hard_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # soft 300, hard 600
    path = save(quadrants(32, 16), tmp_path / "q.png")  # 512 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_rgb(path).size == (32, 16)
    assert reason_of(path, max_pixels=400).startswith("too large: 32x16")


def test_global_pillow_and_warning_state_is_left_alone(tmp_path):
    filters = list(warnings.filters)
    path = save(quadrants(), tmp_path / "q.png")
    load_rgb(path)
    reason_of(path, max_pixels=10)
    assert warnings.filters == filters
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_pillow_warnings_go_to_the_log(tmp_path, caplog):
    broken_exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00"
    path = save(Image.new("RGB", (16, 16)), tmp_path / "exif.jpg", exif=broken_exif)
    caplog.set_level("DEBUG", logger="featurecache")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert load_rgb(path).size == (16, 16)
    assert shown == []
    assert "Corrupt EXIF data" in caplog.text


def test_missing_file(tmp_path):
    assert reason_of(tmp_path / "absent.png") == "file not found"


def test_directory(tmp_path):
    assert reason_of(tmp_path) == "is a directory"


def test_symlink_loop(tmp_path):
    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    assert reason_of(tmp_path / "a.png") == "symlink loop"


_READ_AS_USER = """
import sys
from featurecache.data.images import ImageDecodeError, load_rgb
try:
    load_rgb(sys.argv[1])
except ImageDecodeError as error:
    print(error.reason)
"""


def test_unreadable_file():
    """A real mode-000 file. Root reads files whatever their mode, so under root (as in CI)
    the read runs in a child process with the privileges of `nobody` (setpriv)."""
    folder = Path(tempfile.mkdtemp(prefix="featurecache-unreadable-"))  # reachable by nobody
    try:
        folder.chmod(0o755)
        path = save(quadrants(), folder / "locked.png")
        os.chmod(path, 0)
        if os.geteuid() != 0:
            assert reason_of(path) == "permission denied"
            return
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to run this test as root"
        package = str(Path(images.__file__).resolve().parent.parent)
        closed = [str(p) for p in (Path(package), *Path(package).parents) if not p.stat().st_mode & 0o001]
        if closed:  # e.g. a checkout inside a `mktemp -d` folder (mode 700): nobody cannot import it
            pytest.skip(f"`nobody` cannot reach the package (no o+x on {closed[0]})")
        done = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                               _READ_AS_USER, str(path)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": package})
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "permission denied"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_permission_error_from_open(tmp_path, monkeypatch):
    path = save(quadrants(), tmp_path / "locked.png")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images, "open", refuse, raising=False)
    assert reason_of(path) == "permission denied"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF"])
def test_damaged_files_raise_only_image_decode_error(tmp_path, fmt):
    buffer = io.BytesIO()
    smooth(24, 24).save(buffer, fmt)
    data = buffer.getvalue()
    rng = np.random.default_rng(0)
    path = tmp_path / f"damaged.{fmt.lower()}"
    for trial in range(40):
        damaged = bytearray(data)
        if trial % 2:
            damaged = damaged[: int(rng.integers(1, len(data)))]
        else:
            for offset in rng.integers(0, len(data), size=8):
                damaged[offset] = int(rng.integers(0, 256))
        path.write_bytes(bytes(damaged))
        try:
            assert load_rgb(path).mode == "RGB"
        except ImageDecodeError as error:
            assert error.reason and len(error.reason) <= 200


# --- decoding ----------------------------------------------------------------------


def test_unicode_name_with_spaces(tmp_path):
    path = save(quadrants(), tmp_path / "für bilder 画像 ü.png")
    image = load_rgb(path)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == RED


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    pixels = np.full((16, 16), 40000, np.uint16)
    pixels[0, 0] = 65535
    pixels[0, 1] = 255
    path = save(Image.fromarray(pixels), tmp_path / "deep.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    image = load_rgb(path)
    assert image.getpixel((5, 5)) == (156, 156, 156)  # 40000 / 257 = 155.6; >> 8 = 156
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I"])
def test_integer_modes_scale_by_sixteen_bits(mode):
    image = Image.new(mode, (4, 4), 40000)
    assert to_rgb(image).getpixel((0, 0)) == (156, 156, 156)


def test_float_mode_clips_to_unit_range():
    values = np.array([[-1.0, 0.0, 0.5, 1.0, 7.0, np.nan]], np.float32)
    image = to_rgb(Image.fromarray(values))
    assert [image.getpixel((x, 0))[0] for x in range(6)] == [0, 0, 128, 255, 255, 0]


def test_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    red, green, blue = load_rgb(path).getpixel((16, 16))
    assert red > 240 and green < 15 and blue < 15


def test_transparency_is_composited_over_white(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 128), (8, 0, 16, 16))
    image = load_rgb(save(rgba, tmp_path / "rgba.png"))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((12, 0)) == (255, 127, 127)

    la = Image.new("LA", (16, 16), (0, 0))
    la.paste((0, 255), (8, 0, 16, 16))
    image = load_rgb(save(la, tmp_path / "la.png"))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((12, 0)) == (0, 0, 0)


@pytest.mark.parametrize("suffix", ["png", "gif"])
def test_palette_transparency_is_composited_over_white(tmp_path, suffix):
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (8, 0, 16, 16))
    path = save(palette, tmp_path / f"p.{suffix}", transparency=0)
    image = load_rgb(path)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((12, 0)) == RED


def test_palette_without_transparency(tmp_path):
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image = load_rgb(save(palette, tmp_path / "p.png"))
    assert image.getpixel((0, 0)) == (0, 0, 0)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, GREEN, BLUE)]
    path = save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    assert load_rgb(path).getpixel((8, 8)) == RED


# Pixel layout after applying each EXIF orientation, written with numpy, not Pillow.
EXPECTED_LAYOUT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png_exact(tmp_path, orientation):
    original = quadrants()
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = load_rgb(save(original, tmp_path / "o.png", exif=exif))
    expected = EXPECTED_LAYOUT.get(orientation, lambda a: a)(np.asarray(original))
    np.testing.assert_array_equal(np.asarray(image), expected)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_jpeg_coarse(tmp_path, orientation):
    original = quadrants(64, 32)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = load_rgb(save(original, tmp_path / "o.jpg", exif=exif, quality=95))
    expected = EXPECTED_LAYOUT[orientation](np.asarray(original)).astype(int)
    assert image.size == (expected.shape[1], expected.shape[0])
    got = np.asarray(image).astype(int)
    height, width = expected.shape[:2]
    for y in (height // 4, 3 * height // 4):
        for x in (width // 4, 3 * width // 4):
            assert np.abs(got[y, x] - expected[y, x]).max() < 40, (orientation, x, y)


@pytest.mark.parametrize(
    "mode", ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
             "YCbCr", "LAB", "HSV", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"]
)
def test_to_rgb_handles_every_mode(mode):
    image = to_rgb(Image.new(mode, (5, 3)))
    assert image.mode == "RGB" and image.size == (5, 3)


def test_grayscale_becomes_three_equal_channels():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    pixels = np.asarray(to_rgb(gray))
    assert pixels.shape == (8, 8, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    np.testing.assert_array_equal(pixels[..., 0], np.asarray(gray))


# --- draft mode --------------------------------------------------------------------


def test_draft_decodes_a_large_jpeg_at_reduced_scale(tmp_path):
    path = save(smooth(1024, 768), tmp_path / "big.jpg", quality=95)
    drafted = load_rgb(path, draft_size=(256, 256))
    width, height = drafted.size
    assert width >= 256 and height >= 256
    assert min(width / 256, height / 256) < 2, drafted.size  # no smaller scale would do
    assert drafted.size == (512, 384)

    exact = load_rgb(path).resize((224, 224), Image.Resampling.BILINEAR)
    reduced = drafted.resize((224, 224), Image.Resampling.BILINEAR)
    difference = np.abs(np.asarray(exact, float) - np.asarray(reduced, float)).mean()
    assert difference < 2.0, f"mean abs difference {difference:.3f} (0-255 scale)"


def test_draft_respects_orientation_that_swaps_sides(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 1024x512, shown 512x1024
    path = save(smooth(1024, 512), tmp_path / "tall.jpg", exif=exif)
    assert load_rgb(path, draft_size=(200, 400)).size == (256, 512)


def test_draft_leaves_small_and_non_jpeg_images_alone(tmp_path):
    jpeg = save(smooth(300, 300), tmp_path / "small.jpg")
    png = save(smooth(1024, 768), tmp_path / "big.png")
    assert load_rgb(jpeg, draft_size=(256, 256)).size == (300, 300)
    assert load_rgb(png, draft_size=(256, 256)).size == (1024, 768)


def test_bad_arguments_are_value_errors(tmp_path):
    path = save(quadrants(), tmp_path / "q.png")
    with pytest.raises(ValueError):
        load_rgb(path, max_pixels=0)
    with pytest.raises(ValueError):
        load_rgb(path, draft_size=(0, 10))


# --- arrays ------------------------------------------------------------------------


def test_decode_uint8_arrays():
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(np.asarray(decode_array(gray))[..., 1], gray)
    colour = np.zeros((16, 16, 3), np.uint8)
    colour[..., 0] = 200
    assert decode_array(colour).getpixel((0, 0)) == (200, 0, 0)
    assert decode_array(gray[..., None]).mode == "RGB"


def test_decode_float_array_with_max_value():
    digits = np.array([[0.0, 8.0, 16.0, 20.0]])  # scikit-learn digits hold 0..16
    image = decode_array(digits, max_value=16)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 255]
    assert decode_array(np.array([[0.5]])).getpixel((0, 0)) == (128, 128, 128)


def test_decode_rgba_array_composites_over_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    assert decode_array(rgba).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("shape", [(16,), (3, 16, 16), (16, 16, 2), (0, 16)])
def test_decode_array_refuses_bad_shapes(shape):
    with pytest.raises(ImageDecodeError):
        decode_array(np.zeros(shape, np.uint8))
