"""A pipeline file's TOML tables read into the stages' frozen specs, each error pointing at the
file, the line and the field (`bad.toml:9: extract.image_sise: unknown field; ...`)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

from ..errors import UsageError

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?")


class PipelineText:
    """The file's text, to point errors at a line."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.lines = path, text.splitlines()

    def line(self, table: str | None, index: int = 0, key: str | None = None) -> int:
        current, counts, header = (None, 0), {}, None
        for number, line in enumerate(self.lines, 1):
            match = _HEADER.match(line)
            if match:
                name = match.group(2)
                counts[name] = counts.get(name, -1) + 1 if match.group(1) == "[[" else 0
                current = (name, counts[name])
                if current == (table, index) and header is None:
                    header = number
                continue
            if key and current == (table, index) and re.match(rf"\s*\"?{re.escape(key)}\"?\s*=", line):
                return number
        return header or 1

    def error(self, message: str, table: str | None = None, index: int = 0, key: str | None = None,
              label: str | None = None) -> UsageError:
        where = label or ".".join(p for p in (table, key) if p)
        return UsageError(f"{self.path}:{self.line(table, index, key)}: {where + ': ' if where else ''}{message}")


def convert(value: Any, kind: Any) -> Any:
    """`value` as `kind` (a field's type), or raise TypeError with what was expected."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return convert(value, next(a for a in args if a is not type(None)))
    if kind is Any:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError("an integer")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError("a number")
    if kind is str:
        if isinstance(value, str):
            return value
        raise TypeError("a string (in quotes)")
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError("a list, e.g. [1, 2]")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(v, args[0]) for v in value)
        if len(value) != len(args):
            raise TypeError(f"a list of {len(args)} values")
        return tuple(convert(v, a) for v, a in zip(value, args))
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise TypeError("a table, e.g. { C = 0.1 }")
    return value


def spec_from_table(source: PipelineText, cls: type, values: Any, table: str, index: int = 0, label: str | None = None,
          exclude: tuple[str, ...] = (), fixed: dict | None = None):
    """Build a frozen spec from one TOML table, naming the line of any bad field."""
    label = label or table
    if not isinstance(values, dict):
        raise source.error(f"must be a table ([{table}])", table, index, label=label)
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in exclude]
    kwargs = dict(fixed or {})
    for key, value in values.items():
        if key not in allowed:
            raise source.error(f"unknown field; expected one of: {', '.join(allowed)}", table, index, key,
                               f"{label}.{key}")
        try:
            kwargs[key] = convert(value, hints[key])
        except TypeError as error:
            raise source.error(f"must be {error}, got {value!r}", table, index, key, f"{label}.{key}") from None
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise source.error(f"missing required field {missing[0]!r}", table, index, label=label)
    return cls(**kwargs)
