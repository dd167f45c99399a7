"""The CLI: help for every command, one-line errors with exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from featurecache.cli import app
from helpers import stderr_lines

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()


def _commands():
    import typer.main

    return sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


def _one_line_error(result):
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("arguments, fragment", [
    (["extract", "/no/such/folder"], "dataset not found"),
    (["extract", "digits", "--model", "vgg99"], "unknown model"),
    (["extract", "digits", "--weights", "IMAGENET9K"], "unknown weights"),
    (["extract", "digits", "--weights", "/no/such/file.pt"], "weights file not found"),
    (["extract", "digits", "--tap", "layer9", "--weights", "random"], "unknown tap"),
    (["extract", "digits"], "not on this machine"),  # offline ImageNet weights
    (["info", "nothing-here"], "no cache entry"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(arguments, fragment, tmp_path):
    root = tmp_path / "cache"
    result = runner.invoke(app, [*arguments[:1], *arguments[1:], *(["--root", str(root)] if arguments[0] == "extract" else [])])
    assert result.exit_code == 2, result.output
    assert fragment in _one_line_error(result)
    assert not root.exists() or not any(p.name != "_weights" for p in root.iterdir())


@pytest.mark.parametrize("arguments, fragment", [
    (["extract", "digits", "--image-size", "abc"], "Invalid value for '--image-size'"),
    (["extract", "digits", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["extract", "digits", "--shard-size", "0"], "Invalid value for '--shard-size'"),
    (["extract", "digits", "--precision", "fp64"], "Invalid value for '--precision'"),
    (["extract", "--bogus"], "No such option: --bogus"),
    (["fit-head"], "Missing argument"),
    (["no-such-command"], "No such command"),
    (["fit-head", "x", "--max-memory", "inf"], "is not a size"),
    (["fit-head", "x", "--max-memory", "-inf"], "is not a size"),
    (["fit-head", "x", "--max-memory", "1e400"], "is not a size"),
    (["fit-head", "x", "--max-memory", "nan"], "is not a size"),
])
def test_argument_errors_are_one_line_exit_2(arguments, fragment):
    """Click's own errors (types, ranges, unknown options) obey the same one-line rule."""
    result = runner.invoke(app, arguments)
    assert result.exit_code == 2, result.output
    assert fragment in _one_line_error(result)
    assert "Usage:" not in result.output


def test_bare_command_still_shows_the_help():
    result = runner.invoke(app, [])
    assert "Usage: " in result.output and "fit-head" in result.output


def test_empty_dataset(tmp_path):
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    result = runner.invoke(app, ["extract", str(tmp_path / "empty"), "--weights", "random", "--root", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert "no images found" in _one_line_error(result)
    assert not (tmp_path / "c").exists()


def test_extract_then_hit_then_ls_and_info(image_folder, tmp_path):
    root = str(tmp_path / "c")
    args = ["extract", str(image_folder), "--model", "resnet18", "--weights", "random", "--image-size", "32",
            "--root", root, "--workers", "0", "--precision", "FP32"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "rows: train 10, val 6" in first.stdout
    second = runner.invoke(app, args)
    assert "cache hit" in second.stdout
    listing = runner.invoke(app, ["ls", root])
    assert "photos" in listing.stdout and "resnet18" in listing.stdout
    info = runner.invoke(app, ["info", "photos-resnet18", "--root", root])
    assert info.exit_code == 0 and "random(seed=0)" in info.stdout and "centre crop 32" in info.stdout
    # a typo, a file or an entry given as the root is an error, not "no cache entries"
    entry = next(p for p in (tmp_path / "c").iterdir() if p.name.startswith("photos"))
    for given, fragment in ((tmp_path / "nothere", "does not exist"), (image_folder / "train" / "ants" / "ants_0.png",
                            "is not a folder"), (entry, "is a cache entry, not a cache root; run featurecache info")):
        result = runner.invoke(app, ["ls", str(given)])
        assert result.exit_code == 2 and fragment in _one_line_error(result), result.output


def test_names_that_look_like_markup_print_as_they_are(tmp_path, monkeypatch):
    """Class names, paths and tap labels are data: rich read them as markup, so "[bold]" or
    " [layer3]" vanished from the tables (and a CSV label "cat[/b]" crashed predict with a
    MarkupError traceback)."""
    from helpers import write_photo_folder

    folder = write_photo_folder(tmp_path / "photos", labels=("[bold]a", "[i]b"))
    root = str(tmp_path / "c")
    args = ["extract", str(folder), "--model", "resnet18", "--weights", "random", "--image-size", "32",
            "--root", root, "--workers", "0", "--tap", "pool", "--tap", "layer3"]
    assert runner.invoke(app, args).exit_code == 0
    (entry,) = [p for p in Path(root).iterdir() if p.name.startswith("photos")]
    fitted = runner.invoke(app, ["fit-head", str(entry), "--head", "logistic", "--tap", "layer3", "--name", "l3",
                                 "--param", "C=1.0"])
    assert fitted.exit_code == 0, fitted.output
    board = runner.invoke(app, ["heads", str(entry)])
    assert board.exit_code == 0 and "l3 (logistic) [layer3]" in board.stdout, board.output
    monkeypatch.chdir(folder / "val" / "[i]b")  # a short path leaves the table room for whole names
    result = runner.invoke(app, ["predict", str(entry), "[i]b_0.png", "--head", "l3", "--top-k", "2"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    row = " ".join(result.stdout.split())
    assert "│ [i]b_0.png │" in row and ("│ [i]b │" in row and "│ [bold]a 0." in row
                                        or "│ [bold]a │" in row and "│ [i]b 0." in row), result.stdout


def test_unsafe_pickle_checkpoint_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    checkpoint = tmp_path / "evil.pt"
    with open(checkpoint, "wb") as handle:
        pickle.dump({"conv1.weight": Exploit()}, handle)
    result = runner.invoke(app, ["extract", "digits", "--weights", str(checkpoint), "--root", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert "refused" in _one_line_error(result) or "cannot read checkpoint" in result.stderr
    assert not marker.exists()


def test_library_warnings_print_as_warning_lines(tmp_path):
    """A library warning (Food-101's unlisted images, a resealed manifest) printed bare, unlike the
    CLI's own `warning:` lines; scripts grepping for `warning:` missed it. Own process: logging is
    configured once per process."""
    import subprocess
    import sys

    script = ("import logging\nfrom featurecache.cli.app import app\n"
              "@app.command('say')\ndef say():\n"
              "    logging.getLogger('featurecache').warning('%d images unlisted', 3)\n"
              "    logging.getLogger('featurecache').info('not shown')\n"
              "app(['say'])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "warning: 3 images unlisted\n", result.stderr
