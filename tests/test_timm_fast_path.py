"""finetune --from-cache for timm models (issue 16): a ViT's token-sequence taps (`embed`,
`tokensK`) equal timm's own tokens, the fast path from `tokensK` equals the image path
without augmentation, a missing tap is named with the command that adds it, and only the
unfrozen blocks change; ConvNeXt, EfficientNet and ResNet (timm's) train from their
feature maps the same way; other timm models are refused, saying why. Tiny models, random
weights, 32 px inputs (a ViT's 4 patches)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

timm = pytest.importorskip("timm")

from featurecache import extract, open_cache  # noqa: E402
from featurecache.cli import app  # noqa: E402
from featurecache.backbones.registry import get_backbone, staged_backbone  # noqa: E402
from featurecache.errors import UsageError  # noqa: E402
from featurecache.extract.stage import ExtractSpec  # noqa: E402
from featurecache.finetune.data import train_epoch  # noqa: E402
from featurecache.finetune.stage import FinetuneSpec, _optimizer, _rows, _split_rows, build_model, finetune  # noqa: E402
from featurecache.fit.stage import FitSpec, fit_head  # noqa: E402
from featurecache.pipeline.runner import _fast_path_tap  # noqa: E402
from helpers import write_photo_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VIT = "vit_tiny_patch16_224"  # 12 blocks, width 192, a class token
CPU = torch.device("cpu")


def _timm_tokens(network: torch.nn.Module, x: torch.Tensor, block: int) -> torch.Tensor:
    """Block `block`'s output as timm gives it: prefix tokens then patch tokens, before the final norm."""
    with torch.inference_mode():
        ((patches, prefix),) = network.forward_intermediates(x, indices=[block], norm=False, output_fmt="NLC",
                                                             intermediates_only=True, return_prefix_tokens=True)
    return torch.cat([prefix, patches], dim=1)


def _timm_embed(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Block 0's input, by hand from timm's modules (forward_features up to its blocks)."""
    with torch.inference_mode():
        return network.norm_pre(network.patch_drop(network._pos_embed(network.patch_embed(x))))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_photo_folder(tmp_path_factory.mktemp("vit") / "photos")


def _cache(folder, root, taps, dtype="float32"):
    cache = open_cache(extract(ExtractSpec(source=str(folder), model=f"timm:{VIT}", weights="random", image_size=32,
                                           precision="fp32", dtype=dtype, batch_size=4, workers=0, root=str(root),
                                           taps=taps, optimize="eager")).path)
    fit_head(cache, FitSpec(head="logistic", name="logistic"))
    return cache


@pytest.fixture(scope="module")
def caches(folder, tmp_path_factory):
    """Entries with taps pool and tokens9 and a logistic head, by storage dtype, made on first use."""
    made = {}

    def get(dtype: str):
        if dtype not in made:
            made[dtype] = _cache(folder, tmp_path_factory.mktemp(dtype), ("pool", "tokens9"), dtype)
        return made[dtype]

    return get


def _spec(**changes) -> FinetuneSpec:
    return FinetuneSpec(**{**dict(head="logistic", unfreeze="blocks:2", epochs=1, batch_size=4, workers=0,
                                  precision="fp32", device="cpu", augment=False, hflip=False, lr=1e-2,
                                  backbone_lr=1e-3), **changes})


def test_token_taps_equal_timms_tokens_and_are_stored_per_row(folder, tmp_path):
    taps = ("embed", "tokens0", "tokens9", "tokens11", "pool")
    cache = open_cache(extract(ExtractSpec(source=str(folder), model=f"timm:{VIT}", weights="random", image_size=32,
                                           precision="fp32", dtype="float32", batch_size=4, workers=0,
                                           root=str(tmp_path / "c"), taps=taps, optimize="eager")).path)
    tokens, width = 1 + (32 // 16) ** 2, 192  # the class token and 2 x 2 patches
    assert {t: tuple(i["shape"]) for t, i in cache.manifest["taps"].items()} == {
        **{t: (tokens, width) for t in taps[:-1]}, "pool": (width,)}
    staged, x = _staged_and_input(cache, folder)
    network = staged.network
    expected = {"embed": _timm_embed(network, x), **{f"tokens{k}": _timm_tokens(network, x, k) for k in (0, 9, 11)}}
    for tap, values in expected.items():
        stored = cache.features("val", tap)
        assert stored.shape == (len(x), tokens, width)
        np.testing.assert_allclose(stored, values.numpy(), rtol=1e-5, atol=1e-5)
    # The last block's tokens through the final norm and timm's head are the pool tap.
    with torch.inference_mode():
        pooled = network.forward_head(network.norm(torch.from_numpy(cache.features("val", "tokens11"))),
                                      pre_logits=True)
    np.testing.assert_allclose(pooled.numpy(), cache.features("val", "pool"), rtol=1e-5, atol=1e-5)


def _staged_and_input(cache, folder):
    from featurecache.backbones.preprocess import normalize_batch, prepare_image
    from featurecache.data.images import load_rgb
    from featurecache.serve.predict import cache_backbone

    staged, preprocessing = cache_backbone(cache)
    images = torch.stack([prepare_image(load_rgb(folder / p), preprocessing) for p in cache.paths("val")])
    return staged, normalize_batch(images, preprocessing, channels_last=False)


@pytest.mark.parametrize("model, size", [("vit_small_patch14_reg4_dinov2", 28), ("vit_xsmall_patch16_clip_224", 32)])
def test_token_taps_keep_register_tokens_and_norm_pre(model, size):
    """DINOv2 with 4 registers (5 prefix tokens); a CLIP tower, whose norm_pre is a LayerNorm."""
    entry = get_backbone(f"timm:{model}")
    torch.manual_seed(0)
    network = timm.create_model(model, pretrained=False, dynamic_img_size=True).eval()
    staged = staged_backbone(entry, network).eval()
    x = torch.randn(2, 3, size, size)
    last = len(network.blocks) - 1
    with torch.inference_mode():
        ours = staged(x, ["embed", "tokens2", f"tokens{last}"])
    for tap, expected in [("embed", _timm_embed(network, x)), ("tokens2", _timm_tokens(network, x, 2)),
                          (f"tokens{last}", _timm_tokens(network, x, last))]:
        assert tuple(ours[tap].shape[1:]) == entry.description.tap_shape(tap, size), tap
        torch.testing.assert_close(ours[tap], expected, rtol=1e-5, atol=1e-5)


def _both_paths(cache, spec: FinetuneSpec, trainable: list[str], tap: str):
    """(the frozen part's output on the images, {from_cache: (input, first logits, gradients,
    trained state after three AdamW steps)}) over all training rows in one batch."""
    runs = {}
    for from_cache in (False, True):
        spec = dataclasses.replace(spec, from_cache=from_cache)
        model, _, record = build_model(cache, spec)
        assert model.trainable == trainable and model.input_tap == tap
        rows = _rows(cache, _split_rows(cache, record), spec, model)["train"]
        ((x, y),) = rows.batches([list(range(len(rows)))], CPU)
        if not from_cache:
            with torch.no_grad():
                frozen = model.backbone.run(x, 0, model.start)
        model.train()
        logits = model(x, from_tap=from_cache)
        F.cross_entropy(logits, y).backward()
        gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        train_epoch(model, rows, optimizer=_optimizer(model, spec), scaler=torch.amp.GradScaler("cpu", enabled=False),
                    step=0, total_steps=3, batch_size=4, generator=torch.Generator().manual_seed(0),
                    augmentation=None, device=CPU, precision="fp32", seed=0, progress=None, epoch=1)
        runs[from_cache] = (x, logits.detach(), gradients, model.trainable_state())
    return frozen, runs


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_first_steps_from_cache_equal_the_image_path(caches, dtype):
    """The same rows, no augmentation: the cached tokens9 are the frozen part's output (as
    stored), and the logits, gradients and (float32) the weights after three AdamW steps from
    the cache equal the image path's."""
    vit_cache, half = caches(dtype), dtype == "float16"
    frozen, runs = _both_paths(vit_cache, _spec(), ["blocks.10", "blocks.11"], "tokens9")
    cached = runs[True][0]
    assert cached.shape == frozen.shape == (len(cached), 5, 192)
    # Extract's batches of 4 against one batch of 10: summation order only; float16 storage
    # rounds to 11 significant bits (relative error at most 2**-11).
    torch.testing.assert_close(cached, frozen, rtol=2**-10 if half else 1e-5, atol=1e-5)
    # float32: summation order only (measured: logits 4e-9, gradients 2e-7, weights after three
    # AdamW steps 1.3e-5, where the steps moved them by about 3e-3). float16 tokens move the
    # logits by 1e-6 and the gradients by 2e-4; the weights are not compared there, since AdamW
    # moves a weight by up to the learning rate (1e-3) whatever its gradient's size, so a
    # near-zero gradient's rounding flips a whole step.
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-3 if half else 1e-5, atol=1e-5 if half else 1e-7)
    for name, gradient in runs[False][2].items():
        torch.testing.assert_close(runs[True][2][name], gradient, rtol=1e-2 if half else 1e-4,
                                   atol=1e-3 if half else 1e-6, msg=name)
    if not half:
        for name, value in runs[False][3].items():
            torch.testing.assert_close(runs[True][3][name], value, rtol=0, atol=5e-5, msg=name)


def test_only_the_unfrozen_blocks_change(caches):
    cache = caches("float32")
    spec = _spec(from_cache=True, name="only-two")
    model, _, _ = build_model(cache, spec)
    before = {k: v.clone() for k, v in model.backbone.network.state_dict().items()}
    unfrozen = {k for k in before if k.startswith(("blocks.10.", "blocks.11."))}
    run = finetune(cache, spec)
    assert run.record["trainable_blocks"] == ["blocks.10", "blocks.11"] and run.record["input_tap"] == "tokens9"
    trained = {k[len("model.backbone."):]: v for k, v in load_file(str(run.path / "checkpoint.safetensors")).items()
               if k.startswith("model.backbone.")}
    assert set(trained) == unfrozen
    assert all(not torch.equal(trained[k], before[k]) for k in unfrozen)
    # In place: one AdamW step on all training rows moves those two blocks and nothing else.
    optimizer = _optimizer(model, spec)
    model.train()
    x = torch.from_numpy(cache.features("train", "tokens9"))
    F.cross_entropy(model(x, from_tap=True), torch.from_numpy(cache.labels("train").astype(np.int64))).backward()
    optimizer.step()
    after = model.backbone.network.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == unfrozen


def _cli(*args: str, root) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featurecache", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FEATURECACHE_ROOT": str(root)})


def test_a_missing_token_tap_is_named_with_the_command_that_adds_it(folder, tmp_path):
    cache = _cache(folder, tmp_path / "c", ("pool",))
    done = _cli("finetune", str(cache.path), "--from-cache", "--unfreeze", "2", "--epochs", "1", root=tmp_path / "c")
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stdout + done.stderr
    assert "tap tokens9" in lines[0] and "drop --from-cache" in lines[0], lines[0]
    command = lines[0].split("run: ", 1)[1].split(", then", 1)[0]
    assert command.endswith("--tap pool --tap tokens9"), command
    assert not (cache.path / "finetune").exists()  # refused before anything was written
    # The command it names extracts the same features plus the tap (in this process: the
    # refusal above is the real command line's, and a second interpreter cost 12 s here).
    done = CliRunner().invoke(app, [*shlex.split(command)[1:], "--workers", "0"],
                              env={"FEATURECACHE_ROOT": str(tmp_path / "c")})
    assert done.exit_code == 0, done.output
    (entry,) = [p for p in (tmp_path / "c").iterdir() if p.is_dir() and p != cache.path and not p.name.startswith("_")]
    added = open_cache(entry)
    assert added.manifest["taps"]["tokens9"]["shape"] == [5, 192]
    assert added.manifest["config"]["weights_sha256"] == cache.manifest["config"]["weights_sha256"]
    # Its own batch size and --optimize (not in the key): the same numbers up to summation order (2.4e-6).
    np.testing.assert_allclose(added.features("val", "pool"), cache.features("val", "pool"), rtol=1e-5, atol=1e-5)


CONVNETS = {  # model: (--unfreeze, the tap it trains from, that tap's index in timm's feature_info)
    "convnext_atto": ("stages.3", "stages_2", 2),
    "efficientnet_b0": ("blocks.5+", "blocks_4", 3),
    "resnet18": ("layer4", "layer3", 3),
}


@pytest.mark.parametrize("model", list(CONVNETS))
def test_timm_convnets_train_from_a_cached_feature_map(folder, tmp_path, model):
    """The stage output is timm's own (forward_intermediates), and the fast path from it
    equals the image path (float32 cache, no augmentation)."""
    unfreeze, tap, index = CONVNETS[model]
    weights = "random"
    if model == "convnext_atto":  # timm starts layer scale at 1e-6: blocks would be near-identities
        from safetensors.torch import save_file

        torch.manual_seed(0)
        state = timm.create_model(model, pretrained=False).state_dict()
        weights = str(tmp_path / "convnext.safetensors")
        save_file({k: torch.ones_like(v) if k.endswith(".gamma") else v for k, v in state.items()}, weights)
    cache = open_cache(extract(ExtractSpec(source=str(folder), model=f"timm:{model}", weights=weights, image_size=32,
                                           precision="fp32", dtype="float32", batch_size=4, workers=0,
                                           root=str(tmp_path / "c"), taps=("pool", tap), optimize="eager")).path)
    fit_head(cache, FitSpec(head="logistic", name="logistic"))
    staged, x = _staged_and_input(cache, folder)
    with torch.inference_mode():
        (expected,) = staged.network.forward_intermediates(x, indices=[index], intermediates_only=True)
    assert tuple(cache.manifest["taps"][tap]["shape"]) == tuple(expected.shape[1:])
    np.testing.assert_allclose(cache.features("val", tap), expected.numpy(), rtol=1e-5, atol=1e-5)
    trainable = staged.description.parse_unfreeze(staged, unfreeze)
    assert trainable[0].startswith(f"features.net.{unfreeze.rstrip('+')}.")
    frozen, runs = _both_paths(cache, _spec(unfreeze=unfreeze), trainable, tap)
    cached = runs[True][0]
    torch.testing.assert_close(cached, frozen, rtol=1e-5, atol=1e-5)
    # Measured: ConvNeXt and ResNet bit-identical; EfficientNet (extract's batches of 4 against
    # one of 10) logits 6e-7, each gradient within 5.4e-4 of its largest value (BatchNorm over
    # small variances amplifies the summation order), weights after three steps 2.3e-5. With
    # the starting logistic head from the solver that solves the bias inside (a different
    # point within the same tol) the worst is 1.1e-2 of its largest value (blocks.5.0.bn3.bias,
    # every run; weights after three steps still within 5e-5): EfficientNet's bound is 5e-2. From
    # the chord bias solve's head (2026-12-02, again a point within tol): 1.3e-2, and the weights
    # after three steps 7.3e-5 apart on one entry (blocks.5.0.conv_pw.weight, largest |w| 0.27;
    # every other entry within 1.2e-5): EfficientNet's weight bound is 2e-4, the others' 5e-5.
    # The logits above and the weights below are the tight checks; a wrong block or tap is O(1).
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-5, atol=1e-6)
    for name, gradient in runs[False][2].items():
        worst = float((runs[True][2][name] - gradient).abs().max() / gradient.abs().max().clamp_min(1e-12))
        if os.environ.get("SHOW"):
            print(name, worst)
        assert worst < (5e-2 if model == "efficientnet_b0" else 2e-3), (name, worst)
    for name, value in runs[False][3].items():
        bound = 2e-4 if model == "efficientnet_b0" else 5e-5
        torch.testing.assert_close(runs[True][3][name], value, rtol=0, atol=bound, msg=name)


def test_other_timm_models_have_no_fast_path_and_say_why(folder, tmp_path):
    cache = open_cache(extract(ExtractSpec(source=str(folder), model="timm:regnetx_002", weights="random",
                                           image_size=32, precision="fp32", dtype="float32", batch_size=4, workers=0,
                                           root=str(tmp_path / "c"), optimize="eager")).path)
    fit_head(cache, FitSpec(head="logistic", name="logistic"))
    with pytest.raises(UsageError) as refused:
        finetune(cache, _spec(from_cache=True, unfreeze="1"))
    message = str(refused.value)
    assert "\n" not in message and "timm:regnetx_002" in message and "runs its features as one stage" \
        in message and "drop --from-cache" in message, message


def test_the_pipeline_names_the_token_tap_a_vit_fast_path_needs():
    assert _fast_path_tap(f"timm:{VIT}", "2") == "tokens9"
    assert _fast_path_tap(f"timm:{VIT}", "blocks:1") == "tokens10"
    assert _fast_path_tap(f"timm:{VIT}", "blocks") == "embed"  # every block: from the embedding's output
    assert _fast_path_tap("resnet18", "1") == "layer3"
    assert _fast_path_tap("timm:convnext_atto", "stages.3") == "stages_2"
    assert _fast_path_tap("timm:efficientnet_b0", "blocks.6+") == "blocks_5"
    assert _fast_path_tap("timm:regnetx_002", "1") is None  # refused at run time, saying why


def test_a_run_from_a_token_tap_cannot_end_at_a_tap_that_reads_earlier_blocks():
    """dinov2_linear reads the last four blocks; a run from tokens10 has only blocks 11 on."""
    from featurecache.errors import BackboneError

    entry = get_backbone("timm:vit_tiny_patch16_224")
    with torch.device("meta"):
        staged = staged_backbone(entry, timm.create_model("vit_tiny_patch16_224", pretrained=False))
    tokens = torch.zeros(1, 5, 192, device="meta")
    with pytest.raises(BackboneError, match="reads earlier stages"):
        staged.forward_from("tokens10", tokens, until="dinov2_linear")
    assert staged.forward_from("tokens10", tokens).shape == (1, 192)  # pool, as before
