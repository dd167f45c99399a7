"""Export a Predictor as one TorchScript file that loads in plain PyTorch.

The file holds the backbone (up to the head's tap), the normalisation and the head;
its input is a uint8 or float [0, 1] batch already decoded, resized and centre-cropped as in
`featurecache.json` (its preprocessing's `decode`, `decoding`, `jpeg_draft` and `draft_size`
say how extract decoded the files), which is stored inside the file with the class names:

    extra = {"featurecache.json": ""}
    model = torch.jit.load("model.pt", _extra_files=extra)
    probabilities = model(images)   # (B, 3, S, S) -> (B, C)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..errors import HeadError, StorageError
from ..cache.atomic import remove_stale_temporaries, write_atomic
from ..cache.integrity import output_parents, prepare_output_file
from .predict import CrossPredictor, Predictor

METADATA_FILE = "featurecache.json"


class _Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return (images.float() - self.mean) / self.std


class _Classifier(nn.Module):
    """Backbone stages up to the tap (read from its feature description), flattened, then the head."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        backbone = predictor.backbone
        self.features = backbone.up_to(predictor.tap)  # the stages up to the tap, as its description cuts them
        self.head = predictor.head
        self.half = predictor.storage_dtype == "float16"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x).flatten(1)
        if self.half:  # the head was fitted on float16-stored features
            features = features.half().float()
        return self.head(features)


DECODING = {  # how extract decoded the entry's files: what an exported file's users repeat to see its features
    "pil": "PIL (featurecache.data.images.load_rgb: RGB, EXIF orientation), resized with PIL",
    "torch": "torchvision.io.decode_image (RGB, EXIF orientation), resized with torchvision's antialiased "
             "tensor resize (featurecache.backbones.tensor_decode)",
    "torch-pixels": "PIL (RGB, EXIF orientation), resized with torchvision's antialiased tensor resize "
                    "(featurecache.backbones.tensor_decode)",
}


def preprocessing_record(predictor: Predictor) -> dict:
    """The preprocessing with how files were decoded: `decode`, and `jpeg_draft` with its `draft_size`
    (a JPEG at least twice that size in both sides decoded by libjpeg at 1/2, 1/4 or 1/8 scale,
    PIL's Image.draft("RGB", draft_size)), which change the features as much as the resize does."""
    draft = predictor.draft_size
    return {**predictor.preprocessing.to_dict(), "decode": predictor.decode, "decoding": DECODING[predictor.decode],
            "jpeg_draft": draft is not None, **({"draft_size": list(draft)} if draft is not None else {})}


def export_model(predictor: Predictor, output: str | Path, *, provenance: dict | None = None,
                 overwrite: bool = False) -> Path:
    """Write a TorchScript file (atomically) and return its path.

    An ensemble across cache entries is refused: it runs several backbones, each with its
    own preprocessing, which the file's one input size and preprocessing record cannot describe."""
    if isinstance(predictor, CrossPredictor):
        raise HeadError(
            f"this head votes across cache entries ({', '.join(predictor.labels)}), each backbone with its own "
            "preprocessing, which one exported file does not hold; export each member (featurecache export ENTRY "
            f"--head HEAD -o FILE) and average their probabilities with weights "
            f"{', '.join(f'{w:.4g}' for w in predictor.weights)}, or classify with featurecache predict")
    output = Path(output)
    prepare_output_file(output, "the export folder", "model.pt", overwrite=overwrite)
    size = predictor.preprocessing.crop_size
    # TorchScript still loads everywhere with plain PyTorch; torch >= 2.10 only warns that
    # it is in maintenance mode, which is noise for our users.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        normalize = torch.jit.script(_Normalize(predictor.preprocessing.mean, predictor.preprocessing.std))
        traced = torch.jit.trace(_Classifier(predictor).eval(), torch.rand(2, 3, size, size), check_trace=False)
        model = torch.jit.script(nn.Sequential(normalize, traced).eval())
    metadata = {
        "classes": predictor.classes, "preprocessing": preprocessing_record(predictor),
        "input": "uint8 or float in [0,1], shape (B, 3, S, S), decoded, resized and centre-cropped as in "
                 "preprocessing (its decode says how the cached features' files were decoded)",
        "output": "class probabilities (B, C)", "tap": predictor.tap, "tool_version": __version__,
        **(provenance or {}),
    }
    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(model, str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata)})

    with output_parents(output, "the export folder"):  # made only now, removed again if the write fails
        remove_stale_temporaries(output.parent, (output.name,))
        try:
            write_atomic(output, write, "the exported model")
        except RuntimeError as error:  # torch.jit.save reports a failed write (disk full) as a RuntimeError
            raise StorageError(f"cannot write the exported model {output}: {str(error).splitlines()[0][:200]}; "
                               "nothing was written under that name") from None
    return output
