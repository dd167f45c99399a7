"""timm backbones: the ViT block taps and DINOv2's linear-protocol tap against timm's own
`forward_intermediates`, and crop mode `border` against timm's `create_transform`.

Tiny inputs, random weights; the hymenoptera photos are used only when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")
import timm.data  # noqa: E402

from featurecache import extract, open_cache  # noqa: E402
from featurecache.backbones.preprocess import normalize_batch, prepare_image  # noqa: E402
from featurecache.backbones.registry import Preprocessing, get_backbone, staged_backbone  # noqa: E402
from featurecache.backbones.tensor_decode import resize_crop  # noqa: E402
from featurecache.data.images import load_rgb  # noqa: E402
from featurecache.errors import UsageError  # noqa: E402
from featurecache.extract.stage import ExtractSpec  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"
VIT = "vit_tiny_patch16_224"


def _by_hand(network: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every block's class token and patch mean, and DINOv2's create_linear_input(n=4, avgpool=True),
    from timm's forward_intermediates(norm=True): prefix tokens (class, registers) split off by timm."""
    with torch.inference_mode():
        blocks = network.forward_intermediates(x, norm=True, output_fmt="NLC", intermediates_only=True,
                                               return_prefix_tokens=True)
    out = {f"block{i}": torch.cat([prefix[:, 0], patches.mean(1)], 1) for i, (patches, prefix) in enumerate(blocks)}
    out["dinov2_linear"] = torch.cat([prefix[:, 0] for _, prefix in blocks[-4:]] + [blocks[-1][0].mean(1)], 1)
    return out


def _extract(folder: Path, root: Path, model: str, taps: tuple[str, ...], optimize: str = "eager"):
    return open_cache(extract(ExtractSpec(source=str(folder), model=f"timm:{model}", weights="random", image_size=32,
                                          precision="fp32", dtype="float32", batch_size=4, workers=0, root=str(root),
                                          taps=taps, optimize=optimize)).path)


def _timm_and_input(cache, folder: Path, model: str, split: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """timm's own model with the cache's weights (its classifier random), and the split's images as the cache saw them."""
    network = timm.create_model(model, pretrained=False, **({"dynamic_img_size": True} if "vit" in model else {}))
    state = load_file(str(cache.path.parent / "_weights" / f"{cache.manifest['weights']['sha256']}.safetensors"))
    network.load_state_dict(state, strict=False)
    preprocessing = Preprocessing.from_dict(cache.manifest["config"]["preprocessing"])
    images = torch.stack([prepare_image(load_rgb(folder / p), preprocessing) for p in cache.paths(split)])
    return network.eval(), normalize_batch(images, preprocessing, channels_last=False)


def test_vit_block_taps_and_dinov2_linear_equal_timms_forward_intermediates(image_folder, tmp_path):
    taps = ("block0", "block5", "block11", "dinov2_linear", "pool", "cls", "patch_mean")
    cache = _extract(image_folder, tmp_path / "c", VIT, taps)
    width = 192
    assert {t: tuple(info["shape"]) for t, info in cache.manifest["taps"].items()} == {
        "block0": (2 * width,), "block5": (2 * width,), "block11": (2 * width,), "dinov2_linear": (5 * width,),
        "pool": (width,), "cls": (width,), "patch_mean": (width,)}
    network, x = _timm_and_input(cache, image_folder, VIT, "train")
    expected = _by_hand(network, x)
    with torch.inference_mode():
        tokens = network.forward_features(x)
        expected.update(pool=network.forward_head(tokens, pre_logits=True), cls=tokens[:, 0],
                        patch_mean=tokens[:, 1:].mean(1))
    for tap in taps:
        np.testing.assert_allclose(cache.features("train", tap), expected[tap].numpy(), rtol=1e-4, atol=1e-4)
    # The last block's summary is the class token and patch mean the existing taps give.
    np.testing.assert_array_equal(cache.features("train", "block11"), np.concatenate(
        [cache.features("train", "cls"), cache.features("train", "patch_mean")], 1))


def test_dinov2_linear_with_register_tokens_skips_them():
    """DINOv2 with 4 registers: the patch mean leaves out the class token and the registers;
    `up_to` (what export traces) gives the same as the forward pass."""
    model = "vit_small_patch14_reg4_dinov2"
    entry = get_backbone(f"timm:{model}")
    torch.manual_seed(0)
    network = timm.create_model(model, pretrained=False, dynamic_img_size=True).eval()
    assert network.num_prefix_tokens == 5
    staged = staged_backbone(entry, network).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.inference_mode():
        ours = staged(x, ["block3", "dinov2_linear"])
    expected = _by_hand(network, x)
    assert entry.description.tap_shape("dinov2_linear", 28) == (5 * 384,)
    torch.testing.assert_close(ours["dinov2_linear"], expected["dinov2_linear"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["block3"], expected["block3"], rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # export's module up to the tap reads the same four blocks
        exported = staged.up_to("dinov2_linear")(x)
    torch.testing.assert_close(exported, expected["dinov2_linear"], rtol=1e-5, atol=1e-5)


def _test_images(tmp_path: Path) -> list[Path]:
    """Wide, tall, square and smaller-than-the-input images of noise, made here."""
    rng = np.random.default_rng(0)
    files = []
    for i, (width, height) in enumerate([(97, 41), (40, 90), (64, 64), (23, 17), (300, 200)]):
        file = tmp_path / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(file)
        files.append(file)
    if HYMENOPTERA.is_dir():
        files += sorted(HYMENOPTERA.rglob("*.jpg"))[:2]
    return files


@pytest.mark.parametrize("model,size", [(VIT, 48), ("convnext_atto", 40)])
def test_border_crop_equals_timms_transform(tmp_path, model, size):
    config = timm.data.resolve_data_config({}, model=timm.create_model(model, pretrained=False))
    config = {**config, "input_size": (3, size, size), "crop_mode": "border"}
    transform = timm.data.create_transform(**config)
    preprocessing = get_backbone(f"timm:{model}").preprocessing.with_image_size(size)
    preprocessing = Preprocessing.from_dict({**preprocessing.to_dict(), "crop_mode": "border"})
    fill = torch.tensor([round(255 * v) for v in preprocessing.mean], dtype=torch.uint8).view(3, 1)
    for file in _test_images(tmp_path):
        image = Image.open(file).convert("RGB")
        pixels = prepare_image(image, preprocessing)
        ours = normalize_batch(pixels[None], preprocessing, channels_last=False)[0]
        torch.testing.assert_close(ours, transform(image), rtol=0, atol=1e-6)
        if image.width != image.height:  # padded with the mean colour along the shorter side
            edge = pixels[:, 0, :] if image.width > image.height else pixels[:, :, 0]
            assert torch.equal(edge, fill.expand_as(edge)), file.name
        tensor = resize_crop(torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous(), preprocessing)
        assert tensor.shape == pixels.shape  # the torch decode path: the same geometry, its own resampling
        assert (tensor.int() - pixels.int()).abs().float().mean() < 2, file.name


def test_crop_mode_is_in_the_key_and_refused_when_unknown(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "wide"
    for split, label, i in [(s, c, i) for s in ("train", "val") for c in ("ants", "bees") for i in range(2)]:
        (folder / split / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30, 80, 3), dtype=np.uint8)).save(folder / split / label / f"{i}.png")

    def spec(**changes) -> ExtractSpec:
        return ExtractSpec(**{**dict(source=str(folder), model="timm:convnext_atto", weights="random",
                                     image_size=32, precision="fp32", dtype="float32", batch_size=4, workers=0,
                                     root=str(tmp_path / "c"), optimize="eager"), **changes})

    center, border = extract(spec()), extract(spec(crop_mode="border"))
    assert center.key != border.key and center.path != border.path
    manifest = open_cache(border.path).manifest
    assert manifest["config"]["preprocessing"]["crop_mode"] == "border"
    from featurecache.cache.summary import describe_entry

    shown = dict(describe_entry(str(border.path), None))["preprocessing"]
    assert shown.startswith("resize longer side to ") and "pad with the mean colour, centre crop 32" in shown, shown
    assert not np.array_equal(open_cache(center.path).features("train"), open_cache(border.path).features("train"))
    with pytest.raises(UsageError, match="crop-mode"):
        extract(spec(crop_mode="letterbox"))


@pytest.mark.parametrize("model,optimize", [("convnext_atto", "fuse"), ("resnet18", "eager")])
def test_convnet_stage_taps_equal_timms_forward_intermediates(image_folder, tmp_path, model, optimize):
    entry = get_backbone(f"timm:{model}")
    channels = [e["num_chs"] for e in timm.create_model(model, pretrained=False).feature_info]
    stages = tuple(f"stage{i}" for i in range(len(channels)))
    maps = {"convnext_atto": ("stem", "stages_0", "stages_1", "stages_2", "stages_3"),  # each unit's feature map
            "resnet18": ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3")}[model]
    assert entry.description.tap_names == (*stages, *maps, "pool")
    taps = (stages[1], stages[-1], "pool")
    cache = _extract(image_folder, tmp_path / "c", model, taps, optimize)
    assert {t: tuple(i["shape"]) for t, i in cache.manifest["taps"].items()} == {
        stages[1]: (channels[1],), stages[-1]: (channels[-1],), "pool": (entry.description.tap("pool").channels,)}
    network, x = _timm_and_input(cache, image_folder, model, "val")
    with torch.inference_mode():
        maps = network.forward_intermediates(x, indices=[1, len(channels) - 1], intermediates_only=True)
        pool = network.forward_head(network.forward_features(x), pre_logits=True)
    for tap, expected in zip(taps, [maps[0].mean((2, 3)), maps[1].mean((2, 3)), pool]):
        np.testing.assert_allclose(cache.features("val", tap), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_cli_unknown_crop_mode_is_one_error_line_and_exit_2(image_folder, tmp_path):
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "featurecache", "extract", str(image_folder), "--model",
                           "timm:convnext_atto", "--weights", "random", "--crop-mode", "letterbox"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FEATURECACHE_ROOT": str(tmp_path / "c")})
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and lines == ["error: unknown --crop-mode 'letterbox'; use center, squash or border"], \
        done.stdout + done.stderr
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
