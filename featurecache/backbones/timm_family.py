"""Any timm model as a backbone: `--model timm:NAME`.

timm is imported only when a `timm:` model is asked for. The description reads the
network through timm's own API: the features are `forward_features` then
`forward_head(pre_logits=True)` (tap `pool`); vision transformers are cut into their
embedding, each block and the final norm, so they also offer `cls` (the class token),
`patch_mean` (the mean of the patch tokens), `blockN` (block N's class token and patch
mean, each after the final norm, as timm's `forward_intermediates(norm=True)` gives them),
`dinov2_linear` (DINOv2's linear-evaluation input), and the token sequences the blocks
hand on: `embed` (block 0's input) and `tokensN` (block N's output, prefix tokens
included), from which finetune's fast path runs the blocks after N (`--unfreeze blocks:K`).
Other models with `forward_intermediates` offer `stageN` (entry N of timm's feature_info,
globally averaged). ConvNeXts, EfficientNets and ResNets, whose forward_features runs their
children in order, are cut into those units, so each unit's output is a feature-map tap
(`stages_2`, `blocks_5`, `layer3`) the fast path can start from. Preprocessing comes from
timm's resolved data config (input size, interpolation, mean/std, crop_pct, crop mode);
`--image-size` still overrides the size. Weights: `random`, a file (state dict as timm saves it), or `pretrained`, read from
the local Hugging Face hub cache or timm's torch-hub cache, never downloaded.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import BackboneError, WeightsUnavailableError
from ..options import CROP_MODES
from .description import FeatureDescription, StagedBackbone, Tap, stage_of

PREFIX = "timm"


def _timm():
    try:
        import timm
        import timm.data
    except ImportError:  # pragma: no cover - timm is a dependency
        raise BackboneError("timm is not installed; pip install 'timm>=1.0' to use --model timm:NAME") from None
    return timm


class _Method(nn.Module):
    """Calls one method of the network (forward_features, forward_head, ...)."""

    def __init__(self, network: nn.Module, method: str, **kwargs) -> None:
        super().__init__()
        self.net = network
        self.method, self.kwargs = method, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.net, self.method)(x, **self.kwargs)


class _VitEmbed(nn.Module):
    """A ViT's forward_features up to its blocks: patch embedding, position embedding, norm_pre."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.net = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        return net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))


class _Tokens(nn.Module):
    """A readout of the final tokens: the class token, the patch mean or timm's head."""

    def __init__(self, kind: str, prefix_tokens: int = 1, network: nn.Module | None = None) -> None:
        super().__init__()
        self.kind, self.prefix_tokens = kind, prefix_tokens
        if network is not None:
            self.head = _Method(network, "forward_head", pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "cls":
            return x[:, 0]
        if self.kind == "patch_mean":
            return x[:, self.prefix_tokens:].mean(dim=1)
        return self.head(x)


class _Summary(nn.Module):
    """Block outputs summarised after the final norm, as `forward_intermediates(norm=True)`
    gives them: for each (input, kind) of `take`, the class token ("cls") or the mean of the
    patch tokens ("mean") of that input (the stages the tap reads, then its own), concatenated."""

    def __init__(self, norm: nn.Module, prefix_tokens: int, take: list[tuple[int, str]]) -> None:
        super().__init__()
        self.norm, self.prefix_tokens, self.take = norm, prefix_tokens, take

    def forward(self, *outputs: torch.Tensor) -> torch.Tensor:
        normed = [self.norm(x) for x in outputs]
        return torch.cat([normed[i][:, 0] if kind == "cls" else normed[i][:, self.prefix_tokens:].mean(dim=1)
                          for i, kind in self.take], dim=1)


#: The stage paths of a ConvNet cut into units: under the `features.net.` its block paths have.
FEATURES = "features.net"
#: timm classes whose forward_features runs these children in order (read in timm's source);
#: a child marked * is an nn.Sequential whose items each are a unit (a stage or block group).
_SEQUENTIAL_FEATURES = {
    "timm.models.convnext.ConvNeXt": ("stem", "stages*", "norm_pre"),
    "timm.models.efficientnet.EfficientNet": ("conv_stem", "bn1", "blocks*", "conv_head", "bn2"),
    "timm.models.resnet.ResNet": ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"),
}


def _feature_units(network: nn.Module) -> list[str] | None:
    """forward_features as module paths run in order, for the classes known to be built so
    (None otherwise: the model runs forward_features as one stage and has no fast path)."""
    kind = type(network)
    children = _SEQUENTIAL_FEATURES.get(f"{kind.__module__}.{kind.__qualname__}")
    if children is None:
        return None
    units = []
    for child in children:
        name = child.rstrip("*")
        units += [f"{name}.{i}" for i in range(len(getattr(network, name)))] if child.endswith("*") else [name]
    return units


def _is_vit(network: nn.Module) -> bool:
    return all(hasattr(network, a) for a in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head")) \
        and isinstance(network.blocks, nn.Sequential)


class TimmDescription(FeatureDescription):
    """timm's forward_features / forward_head(pre_logits=True), ViTs cut finer."""

    def __init__(self, network: nn.Module, build) -> None:
        self.build = build
        self._shapes_by_size: dict[int, dict[str, tuple[int, ...]]] = {}  # crop size -> each unit's shape
        self.vit = _is_vit(network)
        classifier = network.pretrained_cfg.get("classifier") if hasattr(network, "pretrained_cfg") else None
        names = [classifier] if isinstance(classifier, str) else list(classifier or [])
        self.classifier_prefixes = tuple(f"{n}." for n in names if n)
        self.classifier_names = tuple(names)
        width = int(network.num_features)
        self.units = None if self.vit else _feature_units(network)
        if self.vit:
            taps = self._vit_taps(network, width)
        else:
            maps = []
            if self.units:  # each unit's output but the last: a feature map the rest can run from (stages_2)
                shapes = self._unit_shapes(network, 64)
                maps = [Tap(name=u.replace(".", "_"), stage=f"{FEATURES}.{u}", channels=shapes[u][0],
                            shape=functools.partial(self._unit_shape, u)) for u in self.units[:-1]]
            taps = [*_stage_taps(network), *maps,
                    Tap(name="pool", stage=f"{FEATURES}.{self.units[-1]}" if self.units else "features",
                        channels=self._head_width(network, width),
                        readout=lambda net: _Method(net, "forward_head", pre_logits=True))]
        self.taps = tuple(taps)
        self.block_paths = [] if self.vit else _grouped_blocks(network)
        if self.block_paths:
            self.default_unfreeze = _last_stage(self.block_paths)

    def _vit_taps(self, network: nn.Module, width: int) -> list[Tap]:
        """embed and tokens0..tokensN-1 are the token sequences each stage hands on (resumable);
        block0..blockN-1 and dinov2_linear summarise blocks; pool, cls, patch_mean the final tokens."""
        prefix = int(getattr(network, "num_prefix_tokens", 1))
        has_cls = prefix >= 1 and getattr(network, "cls_token", None) is not None
        count, kinds = len(network.blocks), ["cls", "mean"] if has_cls else ["mean"]
        shape = functools.partial(_token_shape, network, width)

        def summary(take: list[tuple[int, str]]):
            return lambda net: _Summary(net.norm, prefix, take)

        taps = [Tap(name="embed", stage="embed", channels=width, shape=shape)]
        for i in range(count):
            taps += [Tap(name=f"block{i}", stage=f"blocks.{i}", channels=len(kinds) * width,
                         readout=summary([(0, kind) for kind in kinds])),
                     Tap(name=f"tokens{i}", stage=f"blocks.{i}", channels=width, shape=shape)]
        if has_cls and count >= 4:  # DINOv2's create_linear_input(n=4, avgpool=True)
            taps.append(Tap(name="dinov2_linear", stage=f"blocks.{count - 1}", channels=5 * width,
                            reads=tuple(f"blocks.{i}" for i in range(count - 4, count - 1)),
                            readout=summary([(0, "cls"), (1, "cls"), (2, "cls"), (3, "cls"), (3, "mean")])))
        taps.append(Tap(name="pool", stage="norm", channels=self._head_width(network, width),
                        readout=lambda net: _Tokens("pool", network=net)))
        if has_cls:
            taps.append(Tap(name="cls", stage="norm", channels=width, readout=lambda net: _Tokens("cls")))
        taps.append(Tap(name="patch_mean", stage="norm", channels=width,
                        readout=lambda net: _Tokens("patch_mean", prefix)))
        return taps

    @staticmethod
    def _head_width(network: nn.Module, width: int) -> int:
        return int(getattr(network, "head_hidden_size", None) or width)

    def stages(self, network: nn.Module) -> list[tuple[str, nn.Module]]:
        if self.vit:  # one stage per block: each block's output is a tap the rest can run from
            return [("embed", _VitEmbed(network)), *((f"blocks.{i}", b) for i, b in enumerate(network.blocks)),
                    ("norm", network.norm)]
        if self.units:  # forward_features, unit by unit, under the paths its blocks already have
            return [("input", nn.Identity()), *((f"{FEATURES}.{u}", network.get_submodule(u)) for u in self.units)]
        return [("input", nn.Identity()), ("features", _Method(network, "forward_features"))]

    def _unit_shape(self, unit: str, crop_size: int) -> tuple[int, ...]:
        return self._unit_shapes_at(crop_size)[unit]

    def _unit_shapes_at(self, crop_size: int) -> dict[str, tuple[int, ...]]:
        """`_unit_shapes` at a crop size, computed once per size on this description (a
        per-instance dict, not functools.lru_cache, which would keep every description alive)."""
        if crop_size not in self._shapes_by_size:
            with torch.device("meta"):
                self._shapes_by_size[crop_size] = self._unit_shapes(self.build(), crop_size)
        return self._shapes_by_size[crop_size]

    def _unit_shapes(self, network: nn.Module, crop_size: int) -> dict[str, tuple[int, ...]]:
        """Each unit's per-image output shape, run on the meta device (no computation)."""
        x, shapes = torch.empty(1, 3, crop_size, crop_size, device="meta"), {}
        network.eval()  # batch statistics of one row are refused in training mode
        with torch.no_grad():
            for unit in self.units:
                x = network.get_submodule(unit)(x)
                shapes[unit] = tuple(x.shape[1:])
        return shapes

    def blocks(self, staged: StagedBackbone) -> list[str]:
        if self.vit:
            return [f"blocks.{i}" for i in range(len(staged.blocks))]
        return [f"features.net.{path}" for path in self.block_paths]

    def strip_classifier(self, network: nn.Module) -> nn.Module:
        if hasattr(network, "reset_classifier"):
            network.reset_classifier(0)
        return network


def _token_shape(network: nn.Module, width: int, crop_size: int) -> tuple[int, int]:
    """(tokens, width) of a ViT's token sequence at a square input: its prefix tokens (class,
    registers) and one token per patch, as its patch embedding grids the input."""
    embed = network.patch_embed
    if getattr(network, "dynamic_img_size", False) and hasattr(embed, "dynamic_feat_size"):
        rows, columns = embed.dynamic_feat_size((crop_size, crop_size))
    else:
        rows, columns = embed.grid_size
    return int(getattr(network, "num_prefix_tokens", 1)) + int(rows) * int(columns), width


class _StageMean(nn.Module):
    """Entry `index` of a ConvNet's feature_info, globally averaged: timm's own
    `forward_intermediates(indices=[index], stop_early=True)` from the image, so the network
    runs up to that stage once more for this tap."""

    def __init__(self, network: nn.Module, index: int) -> None:
        super().__init__()
        self.net, self.index = network, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (stage,) = self.net.forward_intermediates(x, indices=[self.index], intermediates_only=True, stop_early=True)
        return stage.mean(dim=(2, 3))


def _stage_taps(network: nn.Module) -> list[Tap]:
    """stage0..stageK-1: the entries of timm's feature_info (for ResNets the stem first), where
    the model has forward_intermediates; none otherwise."""
    info = getattr(network, "feature_info", None)
    if not hasattr(network, "forward_intermediates") or not isinstance(info, list) or not info:
        return []
    try:
        channels = [int(entry["num_chs"]) for entry in info]
    except (KeyError, TypeError, ValueError):
        return []
    return [Tap(name=f"stage{i}", stage="input", channels=c, readout=lambda net, i=i: _StageMean(net, i))
            for i, c in enumerate(channels)]


def _grouped_blocks(network: nn.Module) -> list[str]:
    """The network's blocks in forward order, from timm's own parameter groups
    (`group_matcher(coarse=False)`, as timm's layer-wise learning-rate decay uses them): each
    group's top-level modules, the first group (the stem) and the last (the head) left out."""
    try:
        from timm.models._manipulate import group_modules

        groups = list(group_modules(network, network.group_matcher(coarse=False)).values())
    except Exception:  # a model without group_matcher: extract, fit and export still work
        return []
    paths = []
    for index, names in enumerate(groups[1:-1], 1):
        split = [n.split(".") for n in names if n]
        common = []
        for column in zip(*split):
            if len(set(column)) > 1:
                break
            common.append(column[0])
        prefix = ".".join(common)
        others = [n for i, g in enumerate(groups) if i != index for n in g]
        if prefix and not any(n == prefix or n.startswith(prefix + ".") for n in others):
            paths.append(prefix)  # the group is one whole module (a residual block, a ConvNeXt block)
        else:  # its top-level modules (e.g. a stage's downsample and its first block)
            members = set(names)
            tops = [n for n in names if n and not any(n.startswith(m + ".") for m in members if m != n)]
            paths += [p for p in dict.fromkeys(map(_whole_block, tops)) if p not in paths]
    return paths


def _last_stage(paths: list[str]) -> str:
    """A ConvNet's default `--unfreeze`: the stage of its last numbered block, with the
    modules after it ("layer4", "stages.3"; EfficientNet: "blocks.6+", its last block
    and the head convolution after it), as a ResNet's default is its last stage."""
    numbered = [i for i, path in enumerate(paths) if path.rsplit(".", 1)[-1].isdigit()]
    if not numbered:
        return "1"
    stage = stage_of(paths[numbered[-1]])
    return stage if all(stage_of(p) == stage for p in paths[numbered[-1]:]) else f"{stage}+"


def _whole_block(name: str) -> str:
    """A module path cut after its second index: the block it belongs to, as in
    "blocks.6.0.conv_pw" -> "blocks.6.0" (timm groups EfficientNet's last block with its
    head convolution, so the group lists the block's layers one by one)."""
    parts = name.split(".")
    indices = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[: indices[1] + 1]) if len(indices) > 1 else name


@functools.lru_cache(maxsize=None)
def _dynamic_kwargs(model_name: str) -> tuple[tuple[str, object], ...]:
    """ViTs are built with dynamic_img_size so any --image-size works (position embeddings resampled)."""
    timm = _timm()
    try:
        with torch.device("meta"):
            timm.create_model(model_name, pretrained=False, dynamic_img_size=True)
        return (("dynamic_img_size", True),)
    except TypeError:
        return ()


def create(model_name: str) -> nn.Module:
    """The untrained timm network as featurecache builds it."""
    return _timm().create_model(model_name, pretrained=False, **dict(_dynamic_kwargs(model_name)))


def data_config(network: nn.Module) -> dict:
    return _timm().data.resolve_data_config({}, model=network)


def preprocessing_from_config(config: dict):
    """timm's eval transform as a Preprocessing: resize to floor(size / crop_pct) by the crop mode, crop."""
    from .registry import Preprocessing

    _, height, width = config["input_size"]
    crop_mode = config.get("crop_mode") or "center"
    if crop_mode not in CROP_MODES:
        raise BackboneError(f"timm crop mode {crop_mode!r} is not supported ({', '.join(CROP_MODES)} are)")
    crop_pct = float(config.get("crop_pct") or 0.875)
    size = int(height)
    return Preprocessing(resize_size=math.floor(size / crop_pct), crop_size=size,
                         interpolation=str(config.get("interpolation") or "bilinear"),
                         mean=tuple(float(v) for v in config["mean"]), std=tuple(float(v) for v in config["std"]),
                         crop_pct=crop_pct, crop_mode=crop_mode)


def resolve(name: str):
    """The BackboneEntry of `timm:NAME` (built on first use)."""
    from .registry import BackboneEntry

    timm = _timm()
    model_name = name.strip()
    if not model_name or not timm.is_model(model_name):
        close = timm.list_models(f"*{model_name}*")[:5] if model_name else []
        raise BackboneError(f"unknown timm model {model_name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    build = functools.partial(create, model_name)
    with torch.device("meta"):
        network = build()
    description = TimmDescription(network, build)
    return BackboneEntry(name=f"{PREFIX}:{model_name}", build=build, description=description,
                         preprocessing=preprocessing_from_config(data_config(network)),
                         pretrained=functools.partial(pretrained_file, model_name))


def _hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def pretrained_file(model_name: str) -> tuple[Path, str]:
    """(local file, tag) of the model's default pretrained weights, from the Hugging Face hub
    cache or timm's torch-hub cache; WeightsUnavailableError saying where to put the file."""
    with torch.device("meta"):
        network = create(model_name)
    cfg = dict(getattr(network, "pretrained_cfg", {}) or {})
    tag = cfg.get("tag") or ""
    hub_id = cfg.get("hf_hub_id")
    wanted = []
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        cache = _hub_cache()
        filename = cfg.get("hf_hub_filename")
        for candidate in ([filename] if filename else ["model.safetensors", "pytorch_model.bin"]):
            found = try_to_load_from_cache(hub_id, candidate, cache_dir=str(cache))
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found), f"{model_name}.{tag}" if tag else model_name
        folder = cache / f"models--{hub_id.replace('/', '--')}"
        wanted.append(f"put model.safetensors from https://huggingface.co/{hub_id} into the Hugging Face hub cache "
                      f"({folder}/snapshots/<revision>/model.safetensors with refs/main holding <revision>; "
                      f"`huggingface-cli download {hub_id} model.safetensors` on a connected machine, then copy "
                      f"{cache})")
    url = cfg.get("url")
    if url:
        file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if file.is_file():
            return file, f"{model_name}.{tag}" if tag else model_name
        wanted.append(f"download {url} to {file}")
    if not wanted:
        raise WeightsUnavailableError(f"timm has no pretrained weights for {model_name}; pass --weights PATH or "
                                      "--weights random")
    raise WeightsUnavailableError(f"timm:{model_name} pretrained weights are not on this machine (no download is "
                                  f"tried): {'; or '.join(wanted)}; or pass --weights /path/to/model.safetensors, or "
                                  "--weights random to run without them")
