"""Run the real `featurecache` command line in child processes, cheaply.

A fresh Python process costs seconds to import torch, too slow for dozens of kill
tests. A multiprocessing *forkserver* imports featurecache (and torch) once in a clean
process that runs no torch code, then forks one child per command: each child is a
separate process running `featurecache.cli.main` with its own argv and environment,
killed or interrupted like any other. Children use one torch thread, so every run
computes bitwise the same features whatever else the machine is doing, and they know
the `tiny` backbone below, a ResNet-shaped network small enough to cost nothing.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import sys
from pathlib import Path

from torch import nn

from featurecache.backbones.registry import BackboneEntry, available_backbones, register_backbone, unregister_backbone

_context = multiprocessing.get_context("forkserver")
# Everything a child's `extract` imports lazily, imported once in the server instead of in
# every child: these cost a child about 0.4 s, and the crash tests start about a hundred
# (tests/test_crash.py took 152 s with the first two names only, 85 s with all, load ~2).
# A name that cannot be imported is skipped by multiprocessing, never an error.
_PRELOAD = ["featurecache.cli", "featurecache.extract.stage", "featurecache.cache.schema", "featurecache.data.named",
            "featurecache.data.torchvision_datasets", "featurecache.data.layout_checks", "typer._adapters",
            "filelock", "safetensors.torch", "PIL.BmpImagePlugin", "PIL.GifImagePlugin", "PIL.JpegImagePlugin",
            "PIL.PngImagePlugin", "PIL.PpmImagePlugin", "processes"]
_context.set_forkserver_preload(_PRELOAD)


def _stage(channels_in: int, channels_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(channels_out), nn.ReLU())


class TinyResNet(nn.Module):
    """The attributes StagedBackbone cuts a ResNet into, with 8 to 64 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        self.layer1, self.layer2 = _stage(8, 8, 1), _stage(8, 16, 2)
        self.layer3, self.layer4 = _stage(16, 32, 2), _stage(32, 64, 2)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(64, 2)


TINY = BackboneEntry(name="tiny", build=TinyResNet,
                     tap_channels={"layer1": 8, "layer2": 16, "layer3": 32, "layer4": 64, "pool": 64})


def register_tiny() -> None:
    if "tiny" not in available_backbones():
        register_backbone(TINY)


@contextlib.contextmanager
def tiny_backbone():
    """The `tiny` backbone registered in this process for the duration."""
    register_tiny()
    try:
        yield
    finally:
        unregister_backbone("tiny")


def _run_cli(argv: list[str], env: dict[str, str], log: str) -> None:
    os.environ.update(env)
    register_tiny()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(1)
    from featurecache.cli import main

    sys.argv = ["featurecache", *argv]
    main()


def start_cli(argv: list[str], log: Path, *, fault: str = "", **env: str):
    """Start `featurecache ARGV` in a child process; FEATURECACHE_FAULT=fault inside it."""
    environment = {"FEATURECACHE_OFFLINE": "1", "FEATURECACHE_FAULT": fault, "COLUMNS": "200", **env}
    process = _context.Process(target=_run_cli, args=(list(argv), environment, str(log)))
    process.start()
    return process


def run_cli(argv: list[str], log: Path, *, fault: str = "", timeout: float = 120, **env: str) -> int:
    """Run `featurecache ARGV` to its end; returns the exit code (-9 when SIGKILLed)."""
    process = start_cli(argv, log, fault=fault, **env)
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        raise AssertionError(f"featurecache {' '.join(argv)} hung; log:\n{log.read_text()}")
    return process.exitcode


def computed_count(log: Path) -> int:
    """How many images a run sent through the backbone, from its summary line."""
    text = log.read_text()
    if "cache hit" in text:
        return 0
    return int(re.search(r"extracted (\d+) images", text)[1])
