"""`featurecache demo`: the digits pipeline, with ImageNet weights when they are on disk.

Never downloads: without torch hub's ImageNet file it says so and uses random weights.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..errors import UsageError
from .runner import Pipeline, load_pipeline


def demo_pipeline_file() -> Path:
    """pipelines/digits.toml of the source checkout this package runs from."""
    path = Path(__file__).resolve().parents[2] / "pipelines" / "digits.toml"
    if not path.exists():
        raise UsageError(f"the demo pipeline {path} is missing; run featurecache demo from a clone of the "
                         "repository (pip install -e .)")
    return path


def imagenet_weights_file(model: str) -> Path | None:
    """Where torch hub keeps the model's IMAGENET1K_V1 file (None: the model has no such weights)."""
    import torch

    from ..backbones.registry import get_backbone

    enum = get_backbone(model).weights_enum
    if enum is None or "IMAGENET1K_V1" not in enum.__members__:
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum["IMAGENET1K_V1"].url)


def demo_pipeline(*, quick: bool = False, root: str | Path | None = None) -> tuple[Pipeline, str]:
    """The digits pipeline, with ImageNet weights when they are on disk and random ones otherwise.

    Never downloads. Returns the pipeline and a sentence saying which weights it uses and why.
    `quick` shrinks it for tests: ResNet18 at 32 px, a short MLP, one finetune epoch.
    """
    pipeline = load_pipeline(demo_pipeline_file(), root=root)
    spec, heads, finetune = pipeline.extract, pipeline.heads, pipeline.finetune
    if quick:
        spec = dataclasses.replace(spec, model="resnet18", image_size=32)
        heads = tuple(dataclasses.replace(h, params={**h.params, "epochs": 5}) if h.head == "mlp" else h
                      for h in heads)
        finetune = finetune and dataclasses.replace(finetune, epochs=1)
    file = imagenet_weights_file(spec.model)
    if file is not None and file.exists():
        note = f"using ImageNet weights ({file})"
        spec = dataclasses.replace(spec, weights="imagenet")
    else:
        note = (f"using RANDOM weights: ImageNet weights for {spec.model} are not on this machine "
                f"({file}), and the demo never downloads. Expect far lower accuracy than with ImageNet "
                f"features; copy that file there and rerun to see the real thing")
        spec = dataclasses.replace(spec, weights="random")
    if quick:
        note += " (quick: ResNet18 at 32 px, 5 MLP epochs, 1 finetune epoch)"
    return dataclasses.replace(pipeline, extract=spec, heads=heads, finetune=finetune), note
