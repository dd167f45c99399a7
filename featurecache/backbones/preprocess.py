"""Image -> fixed-size uint8 tensor (in DataLoader workers) -> normalised batch (on the device).

Resizing happens on the CPU in the workers, so only small uint8 tensors cross process
and device boundaries; the float conversion and normalisation run on the device.
Small images are upsampled to the input size, never zero-padded: an ImageNet network
fed 32x32 pixels, or 64x64 pixels padded to 224, sees nothing it was trained on.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from .registry import Preprocessing


def prepare_image(image: Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    """Resize (the shorter side by default), centre-crop, and return a 3 x S x S uint8 tensor."""
    interpolation = InterpolationMode(preprocessing.interpolation)
    size = resize_target(preprocessing, image.height, image.width)
    image = F.resize(image, size, interpolation=interpolation, antialias=True)
    return crop(F.pil_to_tensor(image), preprocessing)


def resize_target(preprocessing: Preprocessing, height: int, width: int) -> int | list[int]:
    """F.resize's size for an image of height x width, by timm's crop mode:

    center (and no mode): the shorter side to resize_size; squash: both sides to resize_size,
    aspect ratio not kept; border: the longer side to resize_size, aspect ratio kept, as
    timm's `ResizeKeepRatio(longest=1.0)` (sides rounded the way it rounds them)."""
    size = preprocessing.resize_size
    if preprocessing.crop_mode == "squash":
        return [size, size]
    if preprocessing.crop_mode == "border":
        ratio = max(height / size, width / size)
        return [round(height / ratio), round(width / ratio)]
    return size


def crop(image: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """The centre crop_size square of a 3 x H x W uint8 tensor. In border mode a side shorter
    than the crop is first padded on both sides with the mean colour, as timm's
    `CenterCropOrPad(fill=round(255 * mean))` does (the extra pixel, if odd, goes right/bottom)."""
    side = preprocessing.crop_size
    if preprocessing.crop_mode == "border":
        _, height, width = image.shape
        top, left = max(side - height, 0) // 2, max(side - width, 0) // 2
        if height < side or width < side:
            fill = torch.tensor([round(255 * v) for v in preprocessing.mean], dtype=image.dtype, device=image.device)
            canvas = fill.view(3, 1, 1).repeat(1, max(height, side), max(width, side))
            canvas[:, top:top + height, left:left + width] = image
            image = canvas
    return F.center_crop(image, side)


def normalize_batch(batch: torch.Tensor, preprocessing: Preprocessing, *, channels_last: bool = True) -> torch.Tensor:
    """uint8 B x 3 x S x S -> float32, scaled to [0, 1] and normalised by mean/std."""
    mean = torch.tensor(preprocessing.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, device=batch.device).view(1, 3, 1, 1)
    out = (batch.float() / 255.0 - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out
