"""finetune --from-cache on an entry that lacks the tap it trains from suggests an extract
command; run as printed, it must make the entry it promises: in the entry's own cache root
(it left out --root, so the new entry went to the default root instead), with the tap."""

from __future__ import annotations

import shlex

import pytest
from typer.testing import CliRunner

from featurecache.cache.store import list_entries, open_cache
from featurecache.cli import app
from helpers import stderr_lines, write_photo_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXTRACT = ["--model", "resnet18", "--weights", "random", "--seed", "3", "--image-size", "32", "--precision", "fp32",
           "--dtype", "float32", "--workers", "0", "-q"]
FINETUNE = ["--from-cache", "--unfreeze", "layer4", "--epochs", "1", "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "-q"]


def cli(*arguments):
    return CliRunner().invoke(app, [str(a) for a in arguments])


def test_the_suggested_extract_command_works_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_photo_folder(tmp_path / "my photos")  # a space: the command must quote it
    assert cli("extract", "my photos", *EXTRACT, "--root", "elsewhere").exit_code == 0
    [entry] = list_entries(tmp_path / "elsewhere")
    assert cli("fit-head", entry.name, "--head", "logistic", "--root", "elsewhere").exit_code == 0

    result = cli("finetune", entry.name, "--root", "elsewhere", *FINETUNE)
    assert result.exit_code == 2 and len(stderr_lines(result)) == 1, result.output
    command = stderr_lines(result)[0].split("; run: ", 1)[1].split(", then fit-head", 1)[0]
    assert command == ("featurecache extract 'my photos' --model resnet18 --weights random --seed 3 --image-size 32 "
                       "--dtype float32 --precision fp32 --root elsewhere --tap pool --tap layer3")
    words = shlex.split(command)
    assert words[0] == "featurecache" and cli(*words[1:]).exit_code == 0  # run as printed

    assert not (tmp_path / "cache").exists()  # nothing in the default root ($FEATURECACHE_ROOT)
    [made] = [e for e in list_entries(tmp_path / "elsewhere") if e != entry]
    assert open_cache(made).taps == ["layer3", "pool"]
    assert cli("fit-head", made.name, "--head", "logistic", "--root", "elsewhere").exit_code == 0
    done = cli("finetune", made.name, "--root", "elsewhere", *FINETUNE)  # what the message promised
    assert done.exit_code == 0, done.output
