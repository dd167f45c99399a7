"""Speed options of extract: --optimize (how the forward pass is built) and --draft (JPEG draft decoding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from featurecache import extract, open_cache
from featurecache.backbones.registry import StagedBackbone, get_backbone
from featurecache.errors import UsageError
from featurecache.backbones.optimize import FREEZE_MIN_IMAGES, optimize_backbone, resolve_optimize

from helpers import replace_spec


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _backbone() -> StagedBackbone:
    torch.manual_seed(0)
    return StagedBackbone(get_backbone("resnet18").build()).eval().to(memory_format=torch.channels_last)


def test_auto_picks_freeze_only_for_cpu_fp32():
    cpu = torch.device("cpu")
    assert resolve_optimize("auto", cpu, "fp32") == "freeze"
    assert resolve_optimize("auto", cpu, "fp32", images=FREEZE_MIN_IMAGES) == "freeze"
    assert resolve_optimize("auto", cpu, "fp32", images=FREEZE_MIN_IMAGES - 1) == "fuse"  # build cost not repaid
    assert resolve_optimize("AUTO", cpu, "bf16") == "fuse"
    assert resolve_optimize("freeze", cpu, "bf16") == "fuse"  # TorchScript freeze is fp32-only
    assert resolve_optimize("auto", torch.device("cuda"), "bf16") == "eager"
    assert resolve_optimize("compile", cpu, "fp32") == "compile"
    with pytest.raises(UsageError, match="--optimize"):
        resolve_optimize("fastest", cpu, "fp32")


def test_frozen_forward_matches_eager_for_any_batch_size():
    model = _backbone()
    taps = ("layer3", "pool")
    frozen = optimize_backbone(model, taps, mode="freeze", batch_size=4, image_size=32, device=torch.device("cpu"))
    with torch.inference_mode():
        for rows in (4, 3, 1):
            x = torch.randn(rows, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            expected, got = model(x, taps), frozen(x, taps)
            for tap in taps:
                torch.testing.assert_close(got[tap], expected[tap], rtol=1e-4, atol=1e-4)


def test_folded_batchnorm_matches_eager_and_leaves_the_model_alone():
    model = _backbone()
    for module in model.modules():  # non-trivial statistics, as trained weights have
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    taps = ("layer2", "pool")
    fused = optimize_backbone(model, taps, mode="fuse", batch_size=4, image_size=32, device=torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 20  # resnet18's, untouched
    x = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected, got = model(x, taps), fused(x, taps)
    for tap in taps:
        torch.testing.assert_close(got[tap], expected[tap], rtol=1e-4, atol=1e-4)


def test_compiled_forward_pads_to_one_shape(monkeypatch):
    shapes = []

    def fake_compile(module, **_):
        def run(x):
            shapes.append(tuple(x.shape))
            return module(x)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = _backbone()
    compiled = optimize_backbone(model, ("pool",), mode="compile", batch_size=4, image_size=32, device=torch.device("cpu"))
    with torch.inference_mode():
        x = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        out = compiled(x, ("pool",))["pool"]
        torch.testing.assert_close(out, model(x, ("pool",))["pool"], rtol=1e-4, atol=1e-4)
    assert shapes == [(4, 3, 32, 32)] and out.shape == (3, 512)


def test_a_failing_optimisation_falls_back_to_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("tracer exploded")

    monkeypatch.setattr(torch.jit, "trace", broken)
    model = _backbone()
    assert optimize_backbone(model, ("pool",), mode="freeze", batch_size=4, image_size=32,
                             device=torch.device("cpu")) is model


def test_optimize_modes_give_the_same_cache_entry(image_folder, tiny_spec):
    eager = extract(tiny_spec(image_folder, optimize="eager", root=str(image_folder.parent / "a")))
    fused = extract(tiny_spec(image_folder, optimize="fuse", root=str(image_folder.parent / "c")))
    assert fused.path.name == eager.path.name
    np.testing.assert_allclose(open_cache(fused.path).features("train"), open_cache(eager.path).features("train"),
                               rtol=1e-4, atol=1e-4)
    frozen = extract(tiny_spec(image_folder, optimize="freeze", root=str(image_folder.parent / "b")))
    assert eager.path.name == frozen.path.name  # not part of the key: same function up to rounding
    np.testing.assert_allclose(open_cache(frozen.path).features("train"), open_cache(eager.path).features("train"),
                               rtol=1e-4, atol=1e-4)


def _large_jpegs(root, count=4, size=(640, 480)):
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:size[1], 0:size[0]]
    for i in range(count):
        pixels = np.stack([(xs * (i + 1) + ys * c) % 256 for c in (1, 2, 3)], axis=-1).astype(np.float64)
        pixels += rng.normal(0, 4, pixels.shape)
        path = root / "train" / ("a" if i % 2 else "b") / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return root


def test_draft_is_in_the_key_and_stays_close_to_exact(tmp_path, tiny_spec):
    folder = _large_jpegs(tmp_path / "big")
    exact = extract(tiny_spec(folder))
    drafted = extract(replace_spec(tiny_spec(folder), draft=True))
    assert drafted.path != exact.path and not drafted.cache_hit
    manifest = open_cache(drafted.path).manifest
    assert manifest["config"]["preprocessing"]["jpeg_draft"] is True
    assert "jpeg_draft" not in open_cache(exact.path).manifest["config"]["preprocessing"]
    a, b = open_cache(exact.path).features("train"), open_cache(drafted.path).features("train")
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99, cosine


def test_draft_decodes_large_jpegs_at_reduced_size(tmp_path):
    from featurecache.data.sources import open_source

    source = open_source(str(_large_jpegs(tmp_path / "big", count=1)), allow_layout=True)  # one class
    assert source.load(source.samples[0]).size == (640, 480)
    source.draft_size = (150, 150)
    assert source.load(source.samples[0]).size == (320, 240)  # 1/2 scale: the smallest still >= 150 a side


def test_cli_accepts_draft_and_optimize(tmp_path):
    from featurecache.cli import app

    folder = _large_jpegs(tmp_path / "big", count=2)
    result = CliRunner().invoke(app, ["extract", str(folder), "--model", "resnet18", "--weights", "random",
                                      "--image-size", "32", "--workers", "0", "--draft", "--optimize", "EAGER",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    assert open_cache("".join(result.stdout.split())).manifest["spec"]["draft"] is True  # rich may wrap the path
