"""Tiny, self-contained data and settings for the test suite (no network, no shared data)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from featurecache.extract.stage import ExtractSpec
from helpers import write_photo_folder

# Hugging Face datasets (tests/test_hf_sources.py): never the network, and its Arrow cache in a
# scratch folder. Set before anything imports datasets, which reads them once at import.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="featurecache-tests-hf-")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Never download, and keep every cache under the test's own folder."""
    monkeypatch.setenv("FEATURECACHE_OFFLINE", "1")
    monkeypatch.setenv("FEATURECACHE_ROOT", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's in-process work (`pytestmark = pytest.mark.usefixtures(...)`).
    Its tensors are small, and on a shared 2-core machine two threads spin against other jobs:
    measured 2026-12-02, tests/test_cache_key.py took 72-82 s with two threads and 32 s with one,
    at a load average of 1.3-4.3. The numbers it checks are the same either way."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """train/ and val/ splits, 2 classes, 5 + 3 small images per class."""
    return write_photo_folder(tmp_path / "photos")


@pytest.fixture
def tiny_spec():
    """An ExtractSpec factory: small random ResNet18 at 32 px, fp32, in-process decoding."""

    def make(source, **overrides) -> ExtractSpec:
        base = dict(source=str(source), model="resnet18", weights="random", image_size=32,
                    precision="fp32", dtype="float32", batch_size=4, workers=0, shard_size=4)
        base.update(overrides)
        return ExtractSpec(**base)

    return make
