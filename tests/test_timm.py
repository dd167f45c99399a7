"""Any timm model as a backbone (`--model timm:NAME`): tiny models at random weights, small inputs.

Features equal timm's own forward on the same preprocessed input; preprocessing equals timm's
`create_transform(**resolve_data_config(model=...))`; the key follows model, weights and data
config; heads, predict and finetune work on timm caches; weights load offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

timm = pytest.importorskip("timm")
import timm.data  # noqa: E402

from featurecache import extract, open_cache  # noqa: E402
from featurecache.backbones.preprocess import normalize_batch, prepare_image  # noqa: E402
from featurecache.backbones.registry import Preprocessing, get_backbone  # noqa: E402
from featurecache.data.images import load_rgb  # noqa: E402
from featurecache.errors import WeightsUnavailableError  # noqa: E402
from featurecache.extract.stage import ExtractSpec  # noqa: E402
from featurecache.finetune.stage import FinetuneSpec, build_model, finetune  # noqa: E402
from featurecache.fit.stage import FitSpec, fit_head  # noqa: E402
from featurecache.serve.predict import load_predictor, predict  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"
VIT, CONVNEXT, RESNET = "vit_tiny_patch16_224", "convnext_atto", "resnet18"
TAPS = {VIT: ("pool", "cls", "patch_mean"), CONVNEXT: ("pool",), RESNET: ("pool",)}


def _spec(folder, root, model, **changes) -> ExtractSpec:
    base = dict(source=str(folder), model=f"timm:{model}", weights="random", image_size=32, precision="fp32",
                dtype="float32", batch_size=4, workers=0, root=str(root), taps=TAPS[model], optimize="eager")
    return ExtractSpec(**{**base, **changes})


def _timm_network(model: str, state: dict) -> torch.nn.Module:
    """The model as timm builds it, with the cache's weights (its classifier stays random)."""
    kwargs = {"dynamic_img_size": True} if model.startswith("vit") else {}
    network = timm.create_model(model, pretrained=False, **kwargs)
    missing, unexpected = network.load_state_dict(state, strict=False)
    classifier = network.pretrained_cfg["classifier"]
    assert not unexpected and all(k.startswith(classifier) for k in missing), (missing, unexpected)
    return network.eval()


def _timm_features(network, x: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        tokens = network.forward_features(x)
        out = {"pool": network.forward_head(tokens, pre_logits=True).numpy()}
        if tokens.ndim == 3:
            out["cls"] = tokens[:, 0].numpy()
            out["patch_mean"] = tokens[:, network.num_prefix_tokens:].mean(1).numpy()
    return out


def _weights(cache) -> dict:
    return load_file(str(cache.path.parent / "_weights" / f"{cache.manifest['weights']['sha256']}.safetensors"))


@pytest.mark.parametrize("model", [VIT, CONVNEXT, RESNET])
def test_features_equal_timms_own_forward(image_folder, tmp_path, model):
    cache = open_cache(extract(_spec(image_folder, tmp_path / "c", model)).path)
    assert cache.manifest["config"]["arch"] == f"timm:{model}"
    preprocessing = Preprocessing.from_dict(cache.manifest["config"]["preprocessing"])
    network = _timm_network(model, _weights(cache))
    for split in ("train", "val"):
        images = torch.stack([prepare_image(load_rgb(image_folder / p), preprocessing) for p in cache.paths(split)])
        expected = _timm_features(network, normalize_batch(images, preprocessing, channels_last=False))
        for tap in TAPS[model]:
            np.testing.assert_allclose(cache.features(split, tap), expected[tap], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="needs /work/shared/data/hymenoptera")
@pytest.mark.parametrize("model", [VIT, CONVNEXT, RESNET])
@pytest.mark.parametrize("size", [None, 64])
def test_preprocessing_equals_timms_transform(model, size):
    entry = get_backbone(f"timm:{model}")
    config = timm.data.resolve_data_config({}, model=timm.create_model(model, pretrained=False))
    preprocessing = entry.preprocessing
    if size is not None:  # --image-size keeps crop_pct, as timm's input_size override does
        preprocessing = preprocessing.with_image_size(size)
        config = {**config, "input_size": (3, size, size)}
    transform = timm.data.create_transform(**config)
    photos = sorted(HYMENOPTERA.rglob("*.jpg"))[:: max(1, len(list(HYMENOPTERA.rglob("*.jpg"))) // 4)][:4]
    assert photos
    for photo in photos:
        image = Image.open(photo).convert("RGB")
        ours = normalize_batch(prepare_image(image, preprocessing)[None], preprocessing, channels_last=False)[0]
        torch.testing.assert_close(ours, transform(image), rtol=0, atol=1e-6)


def test_key_follows_model_weights_and_data_config(image_folder, tmp_path):
    root = tmp_path / "c"
    base = extract(_spec(image_folder, root, CONVNEXT))
    assert extract(_spec(image_folder, root, CONVNEXT)).cache_hit  # the same settings: the same entry
    others = [extract(_spec(image_folder, root, RESNET)), extract(_spec(image_folder, root, CONVNEXT, seed=1)),
              extract(_spec(image_folder, root, CONVNEXT, image_size=48))]
    keys = {base.key, *(o.key for o in others)}
    assert len(keys) == 4 and len({base.path, *(o.path for o in others)}) == 4
    preprocessing = open_cache(base.path).manifest["config"]["preprocessing"]
    assert preprocessing["crop_pct"] == timm.create_model(CONVNEXT).pretrained_cfg["crop_pct"]
    assert preprocessing["crop_mode"] == "center"


def test_heads_predict_and_vit_finetune_of_one_block(image_folder, tmp_path):
    cache = open_cache(extract(_spec(image_folder, tmp_path / "c", VIT, taps=("pool", "cls"))).path)
    fit_head(cache, FitSpec(head="logistic", name="logistic"))
    fit_head(cache, FitSpec(head="logistic", name="on-cls", tap="cls"))
    predictor = load_predictor(cache, "logistic")
    files = [image_folder / p for p in cache.paths("val")]
    got = np.array([[dict(r.top)[c] for c in cache.classes] for r in predict(predictor, files, top_k=2)])
    from featurecache.fit.headstore import load_head

    head, _ = load_head(cache, "logistic")
    np.testing.assert_allclose(got, head.predict_proba(cache.features("val", "pool")), atol=1e-5)

    spec = FinetuneSpec(head="logistic", unfreeze="blocks:1", epochs=1, batch_size=4, workers=0, precision="fp32",
                        device="cpu", hflip=False, backbone_lr=0.01)
    model, _, _ = build_model(cache, spec)
    assert model.trainable == ["blocks.11"]
    run = finetune(cache, spec)
    before = _weights(cache)
    checkpoint = load_file(str(run.path / "checkpoint.safetensors"))
    trained = {k[len("model.backbone."):]: v for k, v in checkpoint.items() if k.startswith("model.backbone.")}
    assert trained and all(k.startswith("blocks.11.") for k in trained), sorted(trained)
    assert any(not torch.equal(v, before[k]) for k, v in trained.items())
    saved = load_file(str(run.path / "backbone.safetensors"))
    assert set(saved) == set(before)
    assert all(k.startswith("blocks.11.") for k in saved if not torch.equal(saved[k], before[k]))


def _fake_hub(root: Path, model: str, state: dict) -> Path:
    """A Hugging Face hub cache holding the model's default pretrained file, as a download leaves it."""
    hub_id = timm.create_model(model, pretrained=False).pretrained_cfg["hf_hub_id"]
    folder = root / f"models--{hub_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    (folder / "snapshots" / revision).mkdir(parents=True)
    file = folder / "snapshots" / revision / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    return file


def test_weights_offline_file_and_pretrained(image_folder, tmp_path, monkeypatch):
    torch.manual_seed(7)
    state = timm.create_model(CONVNEXT, pretrained=False).state_dict()  # with its classifier, as timm saves it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    entry = get_backbone(f"timm:{CONVNEXT}")
    from featurecache.backbones.weights import resolve_weights

    with pytest.raises(WeightsUnavailableError, match="model.safetensors") as missing:
        resolve_weights(entry, "pretrained")
    assert "\n" not in str(missing.value) and str(tmp_path / "hub") in str(missing.value)

    _fake_hub(tmp_path / "hub", CONVNEXT, state)
    pretrained = resolve_weights(entry, "pretrained")
    files = {}
    for suffix in (".safetensors", ".pth"):
        path = tmp_path / f"weights{suffix}"
        if suffix == ".pth":
            torch.save(state, path)
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        files[suffix] = resolve_weights(entry, str(path))
    classifier = timm.create_model(CONVNEXT).pretrained_cfg["classifier"]
    assert not any(k.startswith(classifier + ".") for k in pretrained.state_dict)  # ignored
    assert pretrained.sha256 == files[".safetensors"].sha256 == files[".pth"].sha256
    assert pretrained.sha256 != resolve_weights(entry, "random").sha256

    a = extract(_spec(image_folder, tmp_path / "c", CONVNEXT, weights="pretrained"))
    b = extract(_spec(image_folder, tmp_path / "c", CONVNEXT, weights=str(tmp_path / "weights.pth")))
    assert a.key == b.key  # the same tensors: the same features
    network = _timm_network(CONVNEXT, state)
    cache = open_cache(a.path)
    pre = Preprocessing.from_dict(cache.manifest["config"]["preprocessing"])
    images = torch.stack([prepare_image(load_rgb(image_folder / p), pre) for p in cache.paths("train")])
    np.testing.assert_allclose(cache.features("train"), _timm_features(network, normalize_batch(
        images, pre, channels_last=False))["pool"], rtol=1e-4, atol=1e-4)


def test_cli_missing_pretrained_is_one_error_line(image_folder, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-hub"),
           "TORCH_HOME": str(tmp_path / "torch"), "FEATURECACHE_ROOT": str(tmp_path / "c")}
    done = subprocess.run([sys.executable, "-m", "featurecache", "extract", str(image_folder), "--model",
                           f"timm:{CONVNEXT}", "--weights", "pretrained", "--image-size", "32"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.safetensors" in errors[0] and "huggingface.co/timm/" in errors[0], done.stderr


def test_timm_is_imported_only_for_timm_models():
    probe = ("import sys\nfrom featurecache.backbones.registry import get_backbone\nget_backbone('resnet18')\n"
             "from featurecache.cli import main\nsys.argv = ['featurecache', '--help']\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\nprint('TIMM', 'timm' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "TIMM False" in done.stdout, done.stdout + done.stderr


def test_blocks_of_other_timm_models_come_from_timms_groups(image_folder, tmp_path):
    from featurecache.backbones.registry import staged_backbone
    from featurecache.finetune.stage import parse_unfreeze

    entry = get_backbone(f"timm:{RESNET}")
    with torch.device("meta"):
        staged = staged_backbone(entry, entry.build())
    assert parse_unfreeze(staged, "2") == ["features.net.layer4.0", "features.net.layer4.1"]
    assert len(entry.description.blocks(staged)) == 8  # resnet18's residual blocks, stem and head left out

    cache = open_cache(extract(_spec(image_folder, tmp_path / "c", CONVNEXT)).path)
    fit_head(cache, FitSpec(head="logistic", name="logistic"))
    run = finetune(cache, FinetuneSpec(head="logistic", unfreeze="1", epochs=1, batch_size=4, workers=0,
                                       precision="fp32", device="cpu", hflip=False, backbone_lr=0.01))
    assert run.record["trainable_blocks"] == ["features.net.stages.3.blocks.1"]
    checkpoint = load_file(str(run.path / "checkpoint.safetensors"))
    trained = {k[len("model.backbone.features.net."):]: v for k, v in checkpoint.items()
               if k.startswith("model.backbone.")}
    before = _weights(cache)
    assert trained and all(k.startswith("stages.3.blocks.1.") for k in trained), sorted(trained)
    assert any(not torch.equal(v, before[k]) for k, v in trained.items())
