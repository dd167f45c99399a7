"""`lazy_module`: a module name that imports on first attribute use, then is the module itself.

For libraries a module needs in some functions only (h5py in shards.py), so that the
commands that never call them (`ls`, `info`, `heads`, `--help`) do not pay for the import.
"""

from __future__ import annotations

import importlib
from typing import Any


class _LazyModule:
    __slots__ = ("_name", "_namespace", "_alias")

    def __init__(self, name: str, namespace: dict, alias: str) -> None:
        self._name, self._namespace, self._alias = name, namespace, alias

    def __getattr__(self, attribute: str) -> Any:
        module = importlib.import_module(self._name)  # thread-safe: the import system locks per module
        self._namespace[self._alias] = module  # later look-ups of the global find the module itself
        return getattr(module, attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_module(name: str, namespace: dict, alias: str | None = None) -> Any:
    """Bind `alias` (default: `name`) in `namespace` (a module's globals()) to a lazy import of `name`."""
    return _LazyModule(name, namespace, alias or name)


def lazy_exports(package: str, exports: dict[str, str]):
    """`__getattr__` and `__dir__` for a package whose public names load from submodules on first use.

    `exports` maps a public name to the submodule (relative to `package`) that defines it.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
