"""Small readers shared by the dataset converters: table cells, (gzipped) CSV files, case-insensitive names."""

from __future__ import annotations

import ast
import csv
import gzip
import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "CellError",
    "csv_header",
    "find_ci",
    "float_list",
    "is_missing",
    "literal_list",
    "open_csv",
    "to_float",
]

_MISSING = {"", "nan", "none", "null", "n/a", "na"}


class CellError(ValueError):
    """A table cell that cannot be read; the message names the column and the value."""


def is_missing(value: Any) -> bool:
    """Empty, ``nan``, ``None`` (the literal text or the value)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in _MISSING


def to_float(value: Any, column: str) -> float | None:
    """A number or ``None`` when missing."""
    if is_missing(value):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CellError(f"column {column}: {value!r} is not a number") from None


def literal_list(value: Any, column: str) -> list[str] | None:
    """A Python-literal list cell (``"['normal', ' pleural effusion']"``) -> stripped strings; ``None`` if missing."""
    if is_missing(value):
        return None
    try:
        parsed = ast.literal_eval(str(value).strip())
    except (ValueError, SyntaxError):
        raise CellError(f"column {column}: cannot parse {value!r} as a list") from None
    if not isinstance(parsed, (list, tuple)):
        raise CellError(f"column {column}: {value!r} is not a list")
    return [str(v).strip() for v in parsed]


def float_list(value: Any, n: int | None, column: str) -> list[float]:
    """A comma-separated number cell (``"222.5, 223.1, 275.9, 259.5"``) -> floats, ``n`` of them if given."""
    if is_missing(value):
        raise CellError(f"column {column}: missing value")
    try:
        out = [float(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise CellError(f"column {column}: {value!r} is not a list of numbers") from None
    if n is not None and len(out) != n:
        raise CellError(f"column {column}: expected {n} numbers, got {len(out)} in {value!r}")
    return out


def open_csv(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a CSV file (``.csv`` or ``.csv.gz``) as dicts keyed by the header."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
        yield from csv.DictReader(text)


def csv_header(path: Path) -> list[str]:
    """The header row of a (gzipped) CSV file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
        return next(csv.reader(text), [])


def find_ci(folder: Path, name: str) -> Path | None:
    """``folder/name`` matched case-insensitively (exact match first)."""
    exact = folder / name
    if exact.exists():
        return exact
    if not folder.is_dir():
        return None
    lowered = name.lower()
    for child in folder.iterdir():
        if child.name.lower() == lowered:
            return child
    return None
