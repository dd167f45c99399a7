"""One of each: layout names, the run-naming rule, the device policy and every option
vocabulary are defined in one module and used from there (checked on the source)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import featurecache
from featurecache import options
from featurecache.cache import layout

PACKAGE = Path(featurecache.__file__).parent
VOCABULARIES = {name: getattr(options, name) for name in dir(options)
                if name.isupper() and isinstance(getattr(options, name), tuple)}
#: File and folder names an entry is made of; only cache/layout.py spells them.
FILE_NAMES = (layout.MANIFEST, layout.WEIGHTS_DIR, layout.HEAD_FILE, layout.HEAD_JSON, layout.FINETUNE_RECORD,
              layout.CHECKPOINT_FILE, layout.BACKBONE_FILE, layout.REPORT_FILE)


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(encoding="utf-8"), str(path))


def strings(tree: ast.AST):
    """String constants that are not docstrings, with their line."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_layout_names_are_spelled_only_in_layout():
    offenders = []
    for name, tree in modules():
        if name in ("cache/layout.py", "cache/schema.py"):  # schema: the patterns that check the names on disk
            continue
        for line, value in strings(tree):
            stripped = value.strip("/*.")
            if stripped in FILE_NAMES or value.startswith(f"{layout.SHARDS_DIR}/") or value in ("plus", "-cache"):
                offenders.append(f"{name}:{line} {value!r}")
    assert offenders == []


def test_one_device_and_precision_policy():
    defined = [(name, node.name) for name, tree in modules() for node in ast.walk(tree)
               if isinstance(node, ast.FunctionDef) and node.name in ("resolve_device", "resolve_precision",
                                                                      "autocast", "cuda_devices")]
    assert sorted(defined) == [("device.py", "autocast"), ("device.py", "cuda_devices"),
                               ("device.py", "resolve_device"), ("device.py", "resolve_precision")]


def _vocabulary_like(node: ast.AST) -> tuple[str, ...] | None:
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 \
            and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        values = tuple(e.value for e in node.elts)
        for vocabulary in VOCABULARIES.values():
            if set(values) <= set(vocabulary):
                return values
    return None


def test_each_option_vocabulary_is_defined_once():
    offenders = []
    for name, tree in modules():
        if name == "options.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Literal":
                found = _vocabulary_like(node.slice) or (
                    (node.slice.value,) if isinstance(node.slice, ast.Constant)
                    and any(node.slice.value in v for v in VOCABULARIES.values()) else None)
            elif isinstance(node, ast.ClassDef) and any(isinstance(b, ast.Name) and b.id == "Enum" for b in node.bases):
                found = (node.name,)
            else:
                found = _vocabulary_like(node)
            if found:
                offenders.append(f"{name}:{getattr(node, 'lineno', '?')} {found}")
    assert offenders == []


@pytest.mark.parametrize("enum, vocabulary", [("Precision", "PRECISIONS"), ("Dtype", "DTYPES"), ("Device", "DEVICES"),
                                              ("OnError", "ON_ERROR"), ("Optimize", "OPTIMIZE"),
                                              ("Decode", "DECODES"), ("Compression", "COMPRESSIONS")])
def test_cli_choices_are_the_library_vocabularies(enum, vocabulary):
    import importlib

    app = importlib.import_module("featurecache.cli.app")

    assert [member.value for member in getattr(app, enum)] == list(VOCABULARIES[vocabulary])


def test_schema_types_with_the_vocabularies():
    from typing import get_args

    from featurecache.cache.schema import ConfigRecord, SpecRecord

    assert get_args(SpecRecord.model_fields["precision"].annotation) == options.PRECISIONS
    assert get_args(ConfigRecord.model_fields["precision"].annotation) == options.RESOLVED_PRECISIONS
    assert get_args(ConfigRecord.model_fields["dtype"].annotation) == options.DTYPES


def test_finetune_and_pipeline_name_a_run_alike():
    assert layout.finetune_run_name("logistic", "layer4+layer3", True) == "logistic-layer4pluslayer3-cache"
    assert layout.finetune_run_name("mlp", "layer4", False) == "mlp-layer4"
