"""`--decode torch`: JPEG/PNG decoded by torchvision.io, resized with tensor ops, on the device.

The PIL path (preprocess.py) decodes and resizes in DataLoader workers. This one reads
the file in the worker and checks its header there (size limit, format, mode, with
PIL's lazy open: no pixel is decoded), then:

- on the CPU, decodes with `torchvision.io.decode_image` (libjpeg-turbo, libpng) and
  resizes with torchvision's antialiased tensor resize, still in the worker;
- on a GPU, hands the encoded bytes to the main process, which decodes a whole batch of
  JPEGs at once on the GPU (`decode_jpeg(list, device="cuda")`, nvJPEG) and resizes each
  image there; PNGs decode on the CPU and resize on the GPU.

Files outside what torchvision decodes the same way as `images.load_rgb` (transparency,
palettes, 16-bit, CMYK, other formats) are decoded by PIL exactly as on the PIL path and
only resized here. The numbers differ slightly from PIL's (another resize kernel,
another IDCT on the GPU), so the choice is part of the cache key.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from .registry import Preprocessing
from ..data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_rgb


@contextlib.contextmanager
def _quiet():
    """torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they work and
    are what this path measures. Silenced around our calls, for that message only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        yield
# (format, mode) pairs that torchvision decodes to the same RGB as images.load_rgb
_TORCH_DECODABLE = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")}


@dataclass
class Encoded:
    """What a worker hands over: encoded bytes (`jpeg` or `png`) or decoded `pixels` (3xHxW uint8)."""

    kind: str
    data: torch.Tensor


def read_encoded(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Encoded:
    """The file's bytes when torchvision can decode it like PIL would; else PIL's pixels.

    Raises ImageDecodeError as `images.load_rgb` does.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the size limit is checked below, as load_rgb does
            with Image.open(io.BytesIO(data)) as image:  # header only
                width, height = image.size
                fmt, mode = image.format, image.mode
                plain = "transparency" not in image.info and getattr(image, "n_frames", 1) == 1
    except Exception:  # unreadable, unknown format, bomb, ...: let load_rgb name the problem
        data, fmt = b"", None
    if fmt and (fmt, mode) in _TORCH_DECODABLE and plain and data:
        if width * height > max_pixels:
            raise ImageDecodeError(f"too large: {width}x{height} pixels exceeds limit of {max_pixels}", path)
        return Encoded(fmt.lower(), torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return Encoded("pixels", F.pil_to_tensor(load_rgb(path, max_pixels=max_pixels)))


def pixels(image: Image.Image) -> Encoded:
    """An already decoded RGB image (array sources: digits, CIFAR) as pixels to resize."""
    return Encoded("pixels", F.pil_to_tensor(image))


def decode_one(item: Encoded, device: torch.device | str = "cpu") -> torch.Tensor:
    """3xHxW uint8 RGB on `device`, oriented by EXIF like the PIL path."""
    if item.kind == "pixels":
        return item.data.to(device)
    try:
        with _quiet():
            if item.kind == "jpeg" and torch.device(device).type == "cuda":
                return decode_jpeg(item.data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
            return decode_image(item.data, mode=ImageReadMode.RGB, apply_exif_orientation=True).to(device)
    except RuntimeError as error:
        raise ImageDecodeError(f"cannot decode: {str(error).splitlines()[0]}") from None


def decode_batch(items: Sequence[Encoded], device: torch.device) -> list[torch.Tensor | ImageDecodeError]:
    """Decode many; on a GPU the JPEGs go to nvJPEG in one batched call."""
    out: list[torch.Tensor | ImageDecodeError | None] = [None] * len(items)
    jpegs = [i for i, item in enumerate(items) if item.kind == "jpeg"]
    if device.type == "cuda" and len(jpegs) > 1:
        try:
            with _quiet():
                decoded = decode_jpeg([items[i].data for i in jpegs], mode=ImageReadMode.RGB, device=device,
                                      apply_exif_orientation=True)
            for i, image in zip(jpegs, decoded):
                out[i] = image
        except RuntimeError:
            pass  # one bad file fails the whole call: decode them one by one below to find it
    for i, item in enumerate(items):
        if out[i] is None:
            try:
                out[i] = decode_one(item, device)
            except ImageDecodeError as error:
                out[i] = error
    return out  # type: ignore[return-value]


def resize_crop(image: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """Resize (antialiased) and crop as `preprocess.prepare_image` does: 3 x S x S uint8, on image's device.

    uint8 in, uint8 out, rounded, as PIL's resize returns: the two paths then share
    `normalize_batch`. On the CPU torchvision resizes uint8 directly (its AVX2 path);
    elsewhere in float32, then rounds.
    """
    from .preprocess import crop, resize_target

    interpolation = InterpolationMode(preprocessing.interpolation)
    size = resize_target(preprocessing, image.shape[-2], image.shape[-1])
    if image.device.type == "cpu":
        resized = F.resize(image, size, interpolation=interpolation, antialias=True)
    else:
        resized = F.resize(image.float(), size, interpolation=interpolation, antialias=True)
        resized = resized.round_().clamp_(0, 255).to(torch.uint8)
    return crop(resized, preprocessing)
