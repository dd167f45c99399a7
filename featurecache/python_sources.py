"""Datasets held by Python objects, for `featurecache.extract(source=...)`."""

from __future__ import annotations

from .errors import SourceError
from .sources import Source


def from_python(obj: object, *, name: str | None = None, unlabeled=()) -> Source:
    raise SourceError(f"cannot read a dataset from a {type(obj).__name__}")
