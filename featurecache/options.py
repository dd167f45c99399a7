"""Every option vocabulary, defined once: the library checks against these tuples, the
CLI builds its choices from them (`cli/app.py`), the schemas type with them.

No imports: `featurecache --help` reads it.
"""

from __future__ import annotations

#: Forward-pass precision; "auto" resolves to one of the others (featurecache/device.py).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESOLVED_PRECISIONS = PRECISIONS[1:]
#: Storage dtype of the cached features.
DTYPES = ("float16", "float32")
#: Devices by kind; "cuda:N" names one GPU.
DEVICES = ("auto", "cpu", "cuda")
#: What extract does with an image it cannot read.
ON_ERROR = ("skip", "fail")
#: Forward-pass optimisation of the frozen backbone.
OPTIMIZE = ("auto", "eager", "fuse", "freeze", "compile")
#: Who decodes and resizes the images.
DECODES = ("pil", "torch")
#: How an image is resized and cropped to the input size (timm's eval crop modes).
CROP_MODES = ("center", "squash", "border")
#: HDF5 compression of the features; "none" on the command line is None in the library.
COMPRESSIONS = ("none", "lzf", "gzip")
#: compare --weights: each model's default pretrained weights, or seeded random ones.
COMPARE_WEIGHTS = ("pretrained", "random")


def choices(vocabulary: tuple[str, ...]) -> str:
    """"a, b or c": the allowed values, for an error message."""
    return vocabulary[0] if len(vocabulary) == 1 else f"{', '.join(vocabulary[:-1])} or {vocabulary[-1]}"
