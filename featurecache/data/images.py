"""Decode any image file or array to 8-bit RGB, or say in a few words why not.

`load_rgb` is the one way files become pixels: it checks the size before decoding,
decodes fully (so a truncated file fails here, not later in a batch), applies the EXIF
orientation and converts with `to_rgb`. Every failure raises `ImageDecodeError`,
whose `reason` goes into the manifest as why a file was skipped. Warnings Pillow
raises meanwhile (corrupt EXIF and the like) are logged at debug level, not shown.

Choices, the same everywhere:

- Transparency is composited over white (`BACKGROUND`), for RGBA, LA, PA, P and any
  image carrying a transparent colour.
- 16-bit integer images are scaled (`value >> 8`), not clipped. Mode "I" is treated
  as 16-bit: Pillow uses it for 16-bit PGM and some TIFFs; values outside 0..65535
  are clipped.
- Float images (mode "F") are taken to be in [0, 1], clipped, and scaled by 255.
- No ICC colour management; CMYK uses Pillow's plain conversion (Pillow undoes the
  inverted CMYK that Adobe writes into JPEGs).
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import os
import re
import stat
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from featurecache.errors import FeatureCacheError

logger = logging.getLogger("featurecache")

# Pillow's hard limit (2 x its default MAX_IMAGE_PIXELS of 89,478,485): about
# 13,000 x 13,000 pixels, 537 MB as RGB. Beyond it Pillow refuses the file itself.
DEFAULT_MAX_PIXELS = 89_478_485 * 2

BACKGROUND = (255, 255, 255)
"""Colour that transparent regions are composited over."""

_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
# Modes for which Pillow's convert("RGBA") honours info["transparency"].
_TRANSPARENCY_MODES = ("1", "L", "P", "RGB")
_REASON_LENGTH = 200


class ImageDecodeError(FeatureCacheError):
    """A file or array cannot be decoded; `reason` says why in a few words."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else os.fspath(path)
        super().__init__(reason if self.path is None else f"{self.path}: {reason}")

    def __reduce__(self):  # keep reason and path apart across DataLoader workers
        return type(self), (self.reason, self.path)


def load_rgb(
    path: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Open, fully decode and orient an image file; return it as 8-bit RGB.

    `max_pixels` (width x height) is checked against the header before any pixel is
    decoded. With `draft_size`, a JPEG at least twice as large in both sides is decoded
    by libjpeg at 1/2, 1/4 or 1/8 scale; the result is still at least `draft_size`
    (width, height) after EXIF orientation, so a later resize to that size stays close
    to one from the full image. Animated images give their first frame.

    Raises `ImageDecodeError` for every unreadable file, and `ValueError` for bad
    arguments.
    """
    return _guarded(lambda: _load_rgb(path, max_pixels, draft_size), os.fspath(path), max_pixels, draft_size)


def load_rgb_bytes(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                   draft_size: tuple[int, int] | None = None) -> Image.Image:
    """`load_rgb` for an encoded image held in memory (a Hugging Face dataset's image
    bytes); `name` identifies it in the `ImageDecodeError`."""
    if not data:
        raise ImageDecodeError("empty image bytes", name)
    return _guarded(lambda: _decode(io.BytesIO(data), max_pixels, draft_size), name, max_pixels, draft_size)


def _guarded(decode, name: str, max_pixels: int, draft_size: tuple[int, int] | None) -> Image.Image:
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if draft_size is not None and (len(draft_size) != 2 or min(draft_size) < 1):
        raise ValueError(f"draft_size must be two positive sides, got {draft_size}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        _warn_truncated_images_allowed()
    # catch_warnings changes process-wide state until it exits (so it is not
    # thread-safe): Pillow's warnings go to the log instead of stderr, and the
    # decompression-bomb warning becomes an error, only for this call.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return decode()
        except ImageDecodeError as error:
            raise ImageDecodeError(error.reason, name) from error
        except Exception as error:
            raise ImageDecodeError(_reason_for(error), name) from error
        finally:
            for warning in caught:
                logger.debug("%s: %s", name, warning.message)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to 8-bit RGB (see the module notes).

    Grayscale becomes three equal channels. An RGB image without a transparent
    colour is returned as is.
    """
    mode = image.mode
    if mode in _ALPHA_MODES or (mode in _TRANSPARENCY_MODES and "transparency" in image.info):
        if mode == "La":  # Pillow converts premultiplied La only to LA
            image = image.convert("LA")
        return _composite(image.convert("RGBA"))
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return _gray(values >> 8)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        return _gray(np.rint(np.clip(values, 0.0, 1.0) * 255))
    try:
        return image.convert("RGB")  # 1, L, P, RGBX, CMYK, YCbCr, LAB, HSV
    except ValueError as error:
        raise ImageDecodeError(f"unsupported image mode {mode!r}") from error


def decode_array(array: np.ndarray, *, max_value: float | None = None) -> Image.Image:
    """Turn an HxW, HxWx1, HxWx3 or HxWx4 array into an 8-bit RGB image.

    Values are scaled from [0, max_value] to [0, 255] and clipped. `max_value`
    defaults to 255 for uint8 and other integers, 65535 for uint16, 1 for bool and
    floats; pass e.g. 16 for scikit-learn's digits. HxWx4 is composited over
    `BACKGROUND`.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageDecodeError(
            f"unsupported array shape {array.shape}; expected HxW, HxWx1, HxWx3 or HxWx4"
        )
    if array.size == 0:
        raise ImageDecodeError(f"empty array of shape {array.shape}")
    if not (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.number)):
        raise ImageDecodeError(f"unsupported array dtype {array.dtype}")
    if np.iscomplexobj(array):
        raise ImageDecodeError(f"unsupported array dtype {array.dtype}")
    if max_value is not None and not max_value > 0:
        raise ValueError(f"max_value must be positive, got {max_value}")
    return to_rgb(Image.fromarray(np.ascontiguousarray(_to_uint8(array, max_value))))


def _load_rgb(
    path: str | os.PathLike, max_pixels: int, draft_size: tuple[int, int] | None
) -> Image.Image:
    # stat first: it names directories and symlink loops, and keeps open() from
    # blocking on a FIFO.
    info = os.stat(path)
    if stat.S_ISDIR(info.st_mode):
        raise ImageDecodeError("is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise ImageDecodeError("not a regular file")
    if info.st_size == 0:
        raise ImageDecodeError("empty file")
    with open(path, "rb") as file:
        return _decode(file, max_pixels, draft_size)


def _decode(file, max_pixels: int, draft_size: tuple[int, int] | None) -> Image.Image:
    """Decode an open binary file (or BytesIO) of an encoded image to oriented RGB."""
    with warnings.catch_warnings():
        # At open time the explicit max_pixels check below replaces Pillow's soft
        # limit, so a caller may allow sizes up to Pillow's hard limit.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(file)  # positioned at the first frame
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"too large: {width}x{height} pixels exceeds limit of {max_pixels}"
        )
    if draft_size is not None and image.format == "JPEG":
        _draft(image, draft_size)
    image.load()
    if _orientation(image) in range(2, 9):
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def _draft(image: ImageFile.ImageFile, size: tuple[int, int]) -> None:
    if _orientation(image) in (5, 6, 7, 8):  # these swap width and height
        size = (size[1], size[0])
    width, height = image.size
    if width >= 2 * size[0] and height >= 2 * size[1]:
        image.draft("RGB", size)  # libjpeg picks the smallest scale still >= size


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception as error:  # a broken EXIF block should not cost readable pixels
        logger.warning("ignoring unreadable EXIF data: %s", error)
        return 1


def _composite(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _gray(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.astype(np.uint8)).convert("RGB")


def _to_uint8(array: np.ndarray, max_value: float | None) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if max_value is None:
        if array.dtype == np.uint16:
            max_value = 65535
        elif np.issubdtype(array.dtype, np.integer):
            max_value = 255
        else:
            max_value = 1.0
    if array.dtype == np.uint8 and max_value == 255:
        return array
    values = np.nan_to_num(array.astype(np.float64), nan=0.0)
    return np.rint(np.clip(values / max_value, 0.0, 1.0) * 255).astype(np.uint8)


_ERRNO_REASONS = {
    errno.ENOENT: "file not found",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "is a directory",
    errno.ELOOP: "symlink loop",
    errno.ENAMETOOLONG: "file name too long",
}


def _reason_for(error: Exception) -> str:
    """A short reason for any exception raised while opening or decoding."""
    message = str(error)
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        match = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", message)
        if match:
            return f"too large: {match[1]} pixels exceeds limit of {match[2]}"
        return _shorten(f"too large: {message}")
    if isinstance(error, UnidentifiedImageError):
        return "not an image (cannot identify format)"
    if isinstance(error, OSError) and error.errno in _ERRNO_REASONS:
        return _ERRNO_REASONS[error.errno]
    if isinstance(error, EOFError) or "truncated" in message.lower():
        return "truncated image"
    if isinstance(error, OSError) and error.errno is not None:
        return _shorten(f"cannot read file: {error.strerror}")
    if isinstance(error, MemoryError):
        return "too large to decode (out of memory)"
    if isinstance(error, RecursionError):
        return "corrupt image (recursion limit while parsing)"
    return _shorten(f"corrupt image: {message or type(error).__name__}")


def _shorten(reason: str) -> str:
    reason = " ".join(reason.split())
    return reason if len(reason) <= _REASON_LENGTH else reason[: _REASON_LENGTH - 1] + "…"


@functools.cache
def _warn_truncated_images_allowed() -> None:
    logger.warning(
        "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set outside featurecache): "
        "truncated images will load with missing pixels instead of being skipped"
    )
