"""The package map of ARCHITECTURE.md holds: imports run one way, from the stages down.

Every import between featurecache's packages, at module level or inside a function, is
read from the source with `ast`; a module may import its own package and the layers
below it, never one above (the library never imports the CLI, the cache never imports a
stage, heads never import the fit stage, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

import featurecache

PACKAGE = Path(featurecache.__file__).parent

# Lowest first. Modules of one layer may import each other; a layer imports only layers before it.
LAYERS = [
    {"errors", "faults", "_lazy", "options", "device"},
    {"cache"},
    {"data"},
    {"backbones"},
    {"heads"},
    {"extract"},
    {"fit"},
    {"serve"},
    {"finetune"},
    {"maintain"},
    {"report"},
    {"pipeline"},
    {"cli", "__main__"},
]
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def _unit(parts: tuple[str, ...]) -> str:
    """The layer unit of a module path inside the package: its subpackage, or a top-level module."""
    return parts[0]


def imports_between_units(package: Path = PACKAGE) -> list[tuple[str, str, str]]:
    """(importing file, its unit, the imported unit) for every import across units."""
    found = []
    for file in sorted(package.rglob("*.py")):
        parts = file.relative_to(package).with_suffix("").parts
        if parts == ("__init__",):
            continue  # the top-level package re-exports the public API from every stage
        unit = _unit(parts)
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = parts[: len(parts) - node.level]
                target = base + tuple(node.module.split(".")) if node.module else base
                names = [target[0]] if target else [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("featurecache."):
                names = [node.module.split(".")[1]]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("featurecache.")]
            else:
                continue
            found += [(str(file.relative_to(package)), unit, name) for name in names
                      if name != unit and name != "__version__"]
    return found


def test_every_module_belongs_to_a_layer():
    units = {_unit(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert units <= set(RANK), f"place {sorted(units - set(RANK))} in LAYERS (and ARCHITECTURE.md)"


def test_imports_run_one_way():
    upward = [f"{file} ({unit}) imports {target}" for file, unit, target in imports_between_units()
              if RANK.get(target, -1) > RANK[unit]]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_the_check_sees_imports_inside_functions(tmp_path):
    """The scan must catch a lazy upward import (a function-level `from ..cli import app`)."""
    fake = tmp_path / "featurecache"
    (fake / "cache").mkdir(parents=True)
    (fake / "cli").mkdir()
    (fake / "cache" / "store.py").write_text("def f():\n    from ..cli.app import app\n    return app\n")
    (fake / "cli" / "app.py").write_text("from ..cache.store import f\n")
    found = imports_between_units(fake)
    assert ("cache/store.py", "cache", "cli") in found and ("cli/app.py", "cli", "cache") in found
