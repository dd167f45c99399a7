"""The loop users write: torchvision transforms on PIL images, fp32, batch 100, one process."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision import transforms


def naive_model(model: str = "resnet50") -> torch.nn.Module:
    network = getattr(torchvision.models, model)()  # random weights, as our --weights random
    network.fc = torch.nn.Identity()
    return network.eval()


def naive_transform(image_size: int | None = None) -> transforms.Compose:
    crop = image_size or 224
    return transforms.Compose([
        transforms.Resize(int(math.floor(crop * 256 / 224 + 0.5))), transforms.CenterCrop(crop),
        transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])


def naive_extract(folder: Path, output: Path, *, model: str = "resnet50", image_size: int | None = None,
                  batch_size: int = 100) -> np.ndarray:
    """Build the model, run every image through it under no_grad, save one .npy."""
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=naive_transform(image_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    network = naive_model(model)
    features = []
    with torch.no_grad():
        for images, _ in loader:
            features.append(network(images).numpy())
    array = np.concatenate(features)
    np.save(output, array)
    return array
