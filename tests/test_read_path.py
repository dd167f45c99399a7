"""Reading a split's features: page-aligned with the file, hashed block by block, checked.

`Cache.features` places its output at the file data's offset within a page (the
kernel copies page onto page, 2.2x faster here) and hashes each block as it is read;
every byte still counts toward the checksum, so a flipped byte in any block fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not installed
from benchmarks.read import write_entry  # noqa: E402
from featurecache.cache import shards  # noqa: E402
from featurecache.errors import CorruptCacheError
from featurecache.cache.shards import PAGE_BYTES, empty_like_file
from featurecache.cache.store import open_cache
from helpers import flip_feature_byte

ROWS, DIM = 5000, 24  # two shards of 4,096 rows and 904; 48 bytes a row as float16


@pytest.fixture
def entry(tmp_path, monkeypatch):
    # Blocks of 1000 bytes: many blocks per shard, a short last one, and block edges inside rows.
    monkeypatch.setattr(shards, "READ_BLOCK_BYTES", 1000)
    values = np.random.default_rng(0).random((ROWS, DIM)).astype(np.float32)
    return write_entry(tmp_path / "entry", values, dtype="float16"), values.astype(np.float16)


@pytest.mark.parametrize("offset", [0, 8192, 128, 2 + 4096 * 3, 4094])
@pytest.mark.parametrize("dtype", ["float16", "float32", "uint8"])
def test_empty_like_file_starts_at_the_files_offset_in_its_page(offset, dtype):
    array = empty_like_file((7, 5), dtype, offset)
    assert array.shape == (7, 5) and array.dtype == np.dtype(dtype) and array.flags.c_contiguous
    if offset % np.dtype(dtype).itemsize == 0:
        assert array.ctypes.data % PAGE_BYTES == offset % PAGE_BYTES
    assert array.flags.aligned and array.flags.writeable
    array[...] = 3  # the whole view is usable memory
    assert (array == 3).all()


def test_features_read_in_blocks_equal_the_stored_values_in_page_aligned_memory(entry):
    path, expected = entry
    cache = open_cache(path)
    offset = cache.manifest["shards"][0]["features"]["pool"]["offset"]
    got = cache.features("train")
    np.testing.assert_array_equal(got, expected)
    assert got.ctypes.data % PAGE_BYTES == offset % PAGE_BYTES
    np.testing.assert_array_equal(cache.row_reader("train").read([4999, 0, 4096]), expected[[4999, 0, 4096]])


@pytest.mark.parametrize("shard, at", [(0, 0), (0, 1000 * 50 + 7), (1, 904 * DIM * 2 - 1)])
def test_a_flipped_byte_in_any_block_fails_the_read(entry, shard, at):
    path, _ = entry
    flip_feature_byte(sorted((path / "shards").glob("train-*.h5"))[shard], "pool", at=at, mask=0x04)
    with pytest.raises(CorruptCacheError, match="fails its checksum"):
        open_cache(path).features("train")
    with pytest.raises(CorruptCacheError, match="fails its checksum"):
        open_cache(path).row_reader("train")
