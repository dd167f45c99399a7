"""The classification datasets of `torchvision.datasets` with a fixed on-disk layout,
read through torchvision's own parsers with `download=False` and their official splits.

torchvision is imported only when such a source is opened.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .sources import Source


@dataclass(frozen=True)
class TorchvisionDataset:
    title: str
    layout: str
    splits: str
    open: Callable[..., Source]


TORCHVISION: dict[str, TorchvisionDataset] = {}
