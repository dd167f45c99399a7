"""Smoke test of the benchmarks: the smallest piece of each runs (resnet18, 32 px, a few images).

No timing is asserted; this only keeps `python -m benchmarks` from rotting. At this size the
child scripts that give scaling and streaming their own memory figures run in this process
(`Config.in_process`): the same code, without 4-5 s of interpreter start-up each;
tests/test_streaming.py runs the streaming child as a real process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not installed

from benchmarks.__main__ import MODULES, run_all  # noqa: E402
from benchmarks.common import Config, Row, format_table  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny_config(tmp_path) -> Config:
    return Config.make(tmp_path, tiny=True)


@pytest.mark.parametrize("name", [name for name, _ in MODULES])
def test_each_benchmark_runs_and_gives_rows(name, tiny_config):
    rows = run_all(tiny_config, [name], echo=lambda text: None)
    assert rows and all(isinstance(row, Row) for row in rows)
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1  # header, rule, one line per row


def test_ratio_direction():
    assert Row("x", "speed", 10.0, 5.0).ratio == 2.0
    assert Row("x", "time", 1.0, 4.0, higher_is_better=False).ratio == 4.0
    assert Row("x", "pending", None).ratio is None


def test_gpu_check_says_no_gpu_and_exits_cleanly_without_cuda(monkeypatch, capsys):
    import torch

    from benchmarks.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check would run for minutes")
    monkeypatch.setattr(sys, "argv", ["python -m benchmarks", "--gpu"])  # what `python -m benchmarks --gpu` runs
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    assert out.startswith("no GPU:") and "CUDA is not available" in out
    assert "Traceback" not in err


def test_timm_extraction_benchmark_runs_at_the_smallest_size(image_folder, tmp_path):
    pytest.importorskip("timm")
    from benchmarks.timm_extraction import measure, photo_folder, table

    folder = photo_folder(tmp_path / "work", 4, source=image_folder)
    result = measure(folder, "convnext_atto", 2, tmp_path / "cache", image_size=32, workers=0)
    assert (result.images, result.input_size) == (4, 32) and result.plain_s > 0 and result.ours_s > 0
    assert "convnext_atto | 32 px | 4 |" in table([result])
