"""Heads on features larger than memory: the streamed logistic head against the in-memory one."""

from __future__ import annotations

import pytest

from featurecache import ExtractSpec, extract, open_cache
from featurecache.errors import HeadError
from featurecache.fit import FitSpec, fit_head

# Stated tolerance: the streamed head (minibatch Adam, 10 epochs) lands within 3 points
# of test top-1 of the full-batch L-BFGS head on the same cache.
TOLERANCE = 0.03


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    spec = ExtractSpec(source="digits", model="resnet18", weights="random", image_size=16, precision="fp32",
                       dtype="float16", batch_size=128, workers=0, shard_size=256, root=str(root))
    return extract(spec).path


def test_streamed_logistic_is_close_to_in_memory(digits_cache):
    cache = open_cache(digits_cache)
    in_memory = fit_head(cache, FitSpec(head="logistic", name="memory")).record
    streamed = fit_head(cache, FitSpec(head="logistic", name="streamed", max_memory=1 << 20)).record
    assert streamed["streamed"] and not in_memory["streamed"]
    assert len(streamed["config"]["sweep_"]) >= 10
    gap = in_memory["metrics"]["test"]["top1"] - streamed["metrics"]["test"]["top1"]
    assert gap <= TOLERANCE, (in_memory["metrics"]["test"]["top1"], streamed["metrics"]["test"]["top1"])
    assert streamed["metrics"]["test"]["n"] == 360


def test_heads_that_cannot_stream_say_so(digits_cache):
    with pytest.raises(HeadError, match="memory budget"):
        fit_head(open_cache(digits_cache), FitSpec(head="mlp", max_memory=1 << 20))
