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
    """Resize the shorter side, centre-crop, and return a 3 x S x S uint8 tensor."""
    interpolation = InterpolationMode(preprocessing.interpolation)
    size = preprocessing.resize_size
    if preprocessing.crop_mode == "squash":  # timm: both sides to resize_size, aspect ratio not kept
        size = [size, size]
    image = F.resize(image, size, interpolation=interpolation, antialias=True)
    image = F.center_crop(image, preprocessing.crop_size)
    return F.pil_to_tensor(image)


def normalize_batch(batch: torch.Tensor, preprocessing: Preprocessing, *, channels_last: bool = True) -> torch.Tensor:
    """uint8 B x 3 x S x S -> float32, scaled to [0, 1] and normalised by mean/std."""
    mean = torch.tensor(preprocessing.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, device=batch.device).view(1, 3, 1, 1)
    out = (batch.float() / 255.0 - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out
