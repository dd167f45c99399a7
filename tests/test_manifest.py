"""The manifest is read, changed and written through one module, cache/manifest.py, and
the schema validates every write; old and foreign format versions fail in one line."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import featurecache
from featurecache import extract
from featurecache.cache.manifest import FORMAT_VERSION, read_manifest, write_manifest
from featurecache.cli import app
from featurecache.errors import InvalidRecordError

from helpers import write_image, stderr_lines

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PACKAGE = Path(featurecache.__file__).parent
MUTATORS = {"append", "extend", "update", "pop", "clear", "insert", "setdefault", "remove", "sort"}


def _is_manifest(node: ast.AST) -> bool:
    """`manifest`, `self.manifest`, `cache.manifest`, and subscripts of them."""
    while isinstance(node, ast.Subscript):
        node = node.value
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name.endswith("manifest")


def manifest_changes(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        if any(isinstance(t, ast.Subscript) and _is_manifest(t) for t in targets):
            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} assigns into a manifest")
        if isinstance(node, ast.Delete) and any(isinstance(t, ast.Subscript) and _is_manifest(t) for t in node.targets):
            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} deletes from a manifest")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS \
                and _is_manifest(node.func.value):
            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.func.attr} on a manifest")
    return found


def test_only_the_manifest_module_changes_a_manifest():
    module = PACKAGE / "cache" / "manifest.py"
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) if path != module for hit in manifest_changes(path)]
    assert offenders == []
    assert len(manifest_changes(module)) >= 5  # the scan sees the module's own changes: it can fail


@pytest.fixture
def entry(tmp_path, tiny_spec) -> Path:
    for split, count in (("train", 2), ("val", 2)):
        for label in ("ants", "bees"):
            for i in range(count):
                write_image(tmp_path / "photos" / split / label / f"{label}_{i}.png", hash((split, label, i)) % 1000)
    return extract(tiny_spec(tmp_path / "photos", root=str(tmp_path / "cache"))).path


def test_a_write_is_validated_before_anything_reaches_the_disk(entry):
    before = (entry / "manifest.json").read_bytes()
    manifest = read_manifest(entry)
    manifest["dtype"] = "float64"
    with pytest.raises(InvalidRecordError, match="field dtype"):
        write_manifest(entry, manifest)
    assert (entry / "manifest.json").read_bytes() == before
    assert not [p for p in entry.iterdir() if ".tmp-" in p.name]


def test_reading_and_writing_back_keeps_the_bytes(entry):
    before = (entry / "manifest.json").read_bytes()
    write_manifest(entry, read_manifest(entry))
    assert (entry / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("version", [0, 2, "1"])
def test_another_format_version_fails_in_one_line_naming_it(entry, version):
    path = entry / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": version}))
    result = CliRunner().invoke(app, ["info", str(entry)])
    assert result.exit_code == 2
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert f"format_version: {version!r}" in lines[0] and f"format {FORMAT_VERSION}" in lines[0]
    assert "extract the dataset again" in lines[0]
