"""One atomic writer: every artifact is fsynced under a temporary name, renamed, and its folder fsynced.

Two checks: the source (no module but `cache/atomic.py` renames, fsyncs or makes its
own temporary files), and the behaviour (every file that extract, fit-head, ensemble,
finetune, report, export, export-features and predict -o leave on disk arrived by a
rename of a temporary file that was fsynced first, followed by an fsync of its folder).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

from typer.testing import CliRunner

import featurecache
from featurecache import extract
from featurecache.cache.atomic import is_temporary
from featurecache.cli import app
from featurecache.extract.stage import ExtractSpec
from featurecache.fit.stage import FitSpec, fit_head, make_ensemble

from processes import tiny_backbone

PACKAGE = Path(featurecache.__file__).parent
ATOMIC = PACKAGE / "cache" / "atomic.py"
#: Calls that only the atomic writer may make: renames, fsyncs, home-made temporary files.
FORBIDDEN = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("os", "fsync"), ("os", "fdatasync"),
             ("shutil", "move"), ("tempfile", "NamedTemporaryFile"), ("tempfile", "mkstemp"),
             ("tempfile", "TemporaryFile")}


def forbidden_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else None
            if (name, node.func.attr) in FORBIDDEN or node.func.attr == "rename":  # Path.rename too
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name}.{node.func.attr}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and ".tmp-" in node.value:
            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} a temporary name of its own")
    return found


def test_only_the_atomic_writer_renames_fsyncs_or_names_temporaries():
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) if path != ATOMIC for hit in forbidden_calls(path)]
    assert offenders == []
    assert len(forbidden_calls(ATOMIC)) >= 4  # the scan sees the writer's own calls: it can fail


class Journal:
    """Every os.fsync and os.replace, in order, with real paths."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[tuple[str, str, str]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            self.events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")), ""))
            return real_fsync(fd)

        def replace(src, dst, *args, **kwargs):
            self.events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def published(self) -> set[str]:
        """Final paths written correctly: temp file fsynced, renamed, then its folder fsynced. A
        temporary folder renamed into place (export-features) publishes every file under it
        that was fsynced before the rename."""
        done = set()
        for i, (kind, src, dst) in enumerate(self.events):
            if kind != "replace":
                continue
            assert is_temporary(Path(src).name) and Path(src).parent == Path(dst).parent, (src, dst)
            assert ("fsync", src, "") in self.events[:i], f"{dst} was renamed before its data was fsynced"
            assert ("fsync", str(Path(dst).parent), "") in self.events[i + 1:], f"{dst}: folder never fsynced"
            done.add(dst)
            done.update(dst + path[len(src):] for kind, path, _ in self.events[:i]
                        if kind == "fsync" and path.startswith(src + os.sep))
        return done


def written_files(folder: Path) -> set[str]:
    """Every file under `folder` but lock files (empty; their content is never read)."""
    return {os.path.realpath(p) for p in folder.rglob("*")
            if p.is_file() and not (p.name.startswith(".") and p.name.split(".")[-1] in ("lock", "soft"))}


def test_every_artifact_is_written_atomically(image_folder, tmp_path, monkeypatch):
    journal = Journal(monkeypatch)
    runner = CliRunner()
    with tiny_backbone():
        root = tmp_path / "cache"
        entry = extract(ExtractSpec(source=str(image_folder), model="tiny", weights="random", image_size=32,
                                    precision="fp32", dtype="float32", batch_size=4, workers=0, shard_size=4,
                                    root=str(root))).path
        fit_head(entry, FitSpec(head="logistic", params={"C": 1.0}))
        fit_head(entry, FitSpec(head="knn", params={"k": 3}))
        make_ensemble(entry, ["logistic", "knn"], name="vote")
        out = tmp_path / "out"
        for arguments in (["finetune", entry, "--head", "logistic", "--epochs", "1", "--batch-size", "4",
                           "--workers", "0", "--no-augment", "--name", "ft", "--device", "cpu"],
                          ["report", entry, "-o", out / "report.html"],
                          ["export", entry, "--head", "logistic", "-o", out / "model.pt"],
                          ["export-features", entry, "-o", out / "features"],
                          ["predict", entry, "--head", "logistic", "--split", "val", "-o", out / "val.csv"]):
            result = runner.invoke(app, [str(a) for a in arguments])
            assert result.exit_code == 0, (arguments, result.output, result.exception)
    published = journal.published()
    names = {str(Path(p).relative_to(os.path.realpath(tmp_path))) for p in published}
    for expected in ("manifest.json", "shards/train-00000.h5", "heads/logistic/head.safetensors",
                     "heads/logistic/head.json", "heads/vote/head.safetensors", "finetune/ft/finetune.json",
                     "finetune/ft/checkpoint.safetensors"):
        assert any(name.endswith(expected) for name in names), (expected, sorted(names))
    assert any(name.startswith("cache/_weights/") for name in names)
    for expected in ("out/report.html", "out/model.pt", "out/features/dataset.json",
                     "out/features/train/features.npy", "out/val.csv"):
        assert expected in names, (expected, sorted(names))
    assert written_files(tmp_path / "cache") - published == set()
    assert written_files(out) - published == set()
