"""Commands that need no backbone answer at once: they never import the heavy libraries.

Each command runs in a fresh interpreter (as a user's shell would start it) which then
reports the modules it imported; torch alone costs seconds to import on a 2-core CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from featurecache import extract, open_cache
from featurecache.fit.stage import FitSpec, fit_head

HEAVY = ("torch", "torchvision", "sklearn", "matplotlib", "scipy", "h5py", "PIL", "datasets", "pyarrow")

# Runs the CLI's main() as the console script does, then prints which heavy modules loaded.
_PROBE = """
import json, sys
from featurecache.cli import main
sys.argv = ["featurecache", *json.loads(sys.argv[1])]
code = 0
try:
    main()
except SystemExit as exit:
    code = exit.code if isinstance(exit.code, int) else 0
print("\\nPROBE " + json.dumps({"code": code, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def _probe(arguments: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(arguments)], capture_output=True, text=True,
                          timeout=120)
    line = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert line, done.stdout + done.stderr
    return {**json.loads(line[-1][6:]), "output": done.stdout + done.stderr}


@pytest.fixture(scope="module")
def fitted_entry(tmp_path_factory):
    """A tiny cache entry with one logistic head: something for ls, info and heads to show."""
    from helpers import write_image
    from featurecache.extract.stage import ExtractSpec

    base = tmp_path_factory.mktemp("startup")
    seed = 0
    for split, count in (("train", 4), ("val", 2)):
        for label in ("ants", "bees"):
            for i in range(count):
                seed += 1
                write_image(base / "photos" / split / label / f"{label}_{i}.png", seed)
    spec = ExtractSpec(source=str(base / "photos"), model="resnet18", weights="random", image_size=32,
                       precision="fp32", dtype="float32", batch_size=4, workers=0, shard_size=4,
                       root=str(base / "cache"))
    result = extract(spec)
    fit_head(open_cache(result.path), FitSpec(head="logistic"))
    return base / "cache", result.path


@pytest.mark.parametrize("arguments", [["--help"], ["--version"], ["extract", "--help"], ["fit-head", "--help"],
                                       ["extract", "--no-such-option"], ["no-such-command"]])
def test_help_version_and_argument_errors_import_no_heavy_library(arguments):
    result = _probe(arguments)
    assert result["heavy"] == [], result["output"]
    assert result["code"] == (0 if "--help" in arguments or "--version" in arguments else 2), result["output"]


def test_ls_info_and_heads_import_no_heavy_library(fitted_entry):
    root, entry = fitted_entry
    for arguments, shown in ((["ls", str(root)], "resnet18"), (["info", str(entry)], "centre crop 32"),
                             (["heads", str(entry)], "logistic")):
        result = _probe(arguments)
        assert result["code"] == 0 and shown in result["output"], result["output"]
        assert result["heavy"] == [], (arguments, result["output"])


def test_errors_of_light_commands_import_no_heavy_library(tmp_path):
    result = _probe(["heads", str(tmp_path / "nothing-here")])
    assert result["code"] == 2 and "error: " in result["output"], result["output"]
    assert result["heavy"] == [], result["output"]


def test_package_import_is_light_and_its_names_still_resolve():
    code = ("import sys, featurecache as f; light = 'torch' not in sys.modules; "
            "from featurecache.extract.stage import ExtractSpec; import featurecache.serve.predict; "
            "print(light, callable(f.extract), callable(f.predict), f.open_cache.__name__, f.leaderboard.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", "True", "True", "open_cache", "leaderboard"], done.stdout + done.stderr
