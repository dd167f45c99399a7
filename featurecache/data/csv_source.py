"""A CSV listing (`path,label[,split]`) as a source: every row checked before any work.

Paths are relative to the CSV's folder. A file listed twice, a labelled row in a split
that is not train/val/test, and the listing checks of `layout_checks.py` are refused
with the line that breaks them.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from ..errors import SourceError
from .sources import SPLIT_ALIASES, SPLIT_ORDER, UNLABELED, FileSource, Sample, _file_fingerprint, sort_labels, \
    split_sort_key


class CsvSource(FileSource):
    """A CSV with a header `path,label[,split]`; paths relative to the CSV's folder.

    Labels that all read as numbers are ordered numerically (2 before 10). A row with an
    empty label belongs to an unlabeled split, which must be named (e.g. `test`).
    """

    kind = "csv"

    def __init__(self, csv_path: Path, *, content_hash: bool = False, allow_layout: bool = False) -> None:
        rows = _read_csv_rows(csv_path)
        classes = sort_labels({label for _, _, label, _ in rows if label})
        base = csv_path.parent
        _refuse_repeated_files(csv_path, base, rows)
        samples = []
        for index, (line, path, label, split) in enumerate(rows):
            if label and split not in SPLIT_ORDER and not allow_layout:
                from .layout_checks import OVERRIDE

                raise SourceError(f"{csv_path}:{line}: split {split!r} is not train, val or test (also read: "
                                  f"{', '.join(a for a in SPLIT_ALIASES if a not in SPLIT_ORDER)}), so its labelled "
                                  f"rows would never be scored; fix the name, or {OVERRIDE}")
            file = Path(path) if os.path.isabs(path) else base / path
            relpath = os.path.relpath(file, base) if not os.path.isabs(path) else path
            fingerprint = _file_fingerprint(file, relpath, label, split, content_hash)
            samples.append(Sample(Path(relpath).as_posix(), classes.index(label) if label else UNLABELED, split,
                                  fingerprint, index))
        samples.sort(key=lambda s: split_sort_key(s.split))  # stable: CSV order within a split
        if not allow_layout:
            from .layout_checks import check_classes, refuse_same_files

            check_classes(str(csv_path), classes, samples, what="label")
            refuse_same_files(str(csv_path), base, [s.path for s in samples])
        super().__init__(csv_path.stem, str(base), classes, samples)
        self.csv_path = str(csv_path)

    def identity(self) -> dict:
        return {**super().identity(), "csv": self.csv_path}


def _refuse_repeated_files(csv_path: Path, base: Path, rows: list[tuple[int, str, str, str]]) -> None:
    """A file listed twice (also as `./a.png` beside `a.png`) either contradicts itself, leaks
    between splits or counts twice: refused, naming both lines."""
    first: dict[str, int] = {}
    for line, path, _, _ in rows:
        where = os.path.normpath(path if os.path.isabs(path) else base / path)
        if where in first:
            raise SourceError(f"{csv_path}:{line}: {path} is listed again (first on line {first[where]}); "
                              "list each image once")
        first[where] = line


def _read_csv_rows(csv_path: Path) -> list[tuple[int, str, str, str]]:
    """(line number, path, label, split) of each row; the split with its alias resolved."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            if "path" not in header or "label" not in header:
                raise SourceError(f"{csv_path}: the first line must be a header with path,label[,split]")
            reader.fieldnames = header
            rows = []
            for line_number, row in enumerate(reader, start=2):
                path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
                given = (row.get("split") or "").strip().lower()
                if not given and "split" in header:  # a forgotten cell put a test image in train
                    raise SourceError(f"{csv_path}:{line_number}: the split cell is empty; with a split column, "
                                      "every row names its split (train, val or test)")
                split = SPLIT_ALIASES.get(given or "train", given or "train")
                if not path:
                    raise SourceError(f"{csv_path}:{line_number}: every row needs a path")
                if not label and split == "train":
                    raise SourceError(f"{csv_path}:{line_number}: a row without a label must name an unlabelled "
                                      "split (e.g. test) in a split column; training rows need labels")
                if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", split):
                    raise SourceError(f"{csv_path}:{line_number}: split {split!r} is not a plain name (letters, "
                                      "digits, '_' or '-'); shard files are named after it")
                rows.append((line_number, path, label, split))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise SourceError(f"cannot read CSV {csv_path}: {error}") from None
    return rows
