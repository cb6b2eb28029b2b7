"""Small helpers shared by text-rich source converters: image lookup, names, CSV cells, caption text."""

from __future__ import annotations

import ast
import csv
import html
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "IMAGE_EXTENSIONS",
    "clean_text",
    "find_image",
    "literal_list",
    "read_csv",
    "sanitize_name",
    "title_folder_names",
    "unique_id",
    "word_count",
]

#: extension probing order of the reference scripts (§A.1.1): the full `.jpg` beats a `.gif` thumbnail
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".tif", ".tiff", ".bmp")


def find_image(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` itself when it is a file, else ``folder/stem<ext>`` for the first extension that exists."""
    direct = folder / stem
    if direct.suffix.lower() in IMAGE_EXTENSIONS and direct.is_file():
        return direct
    for ext in IMAGE_EXTENSIONS:
        for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def sanitize_name(title: str) -> str:
    """A title as a folder name: ``/``, ``?``, ``\\``, ``:`` and whitespace become ``_`` (MVD's rule, extended)."""
    return re.sub(r"[/?\\:*\"<>|\s]", "_", title.strip())


def title_folder_names(raw_title: str, *fallbacks: str) -> list[str]:
    """Folder names a case titled ``raw_title`` may have been stored under, in the order to try them: MVD's rule
    (``/``, ``?`` and space to ``_``), ``sanitize_name``, the raw title as MVD also wrote it (unsanitised, so
    possibly nested), the cleaned title (entities decoded, spaces collapsed), then ``fallbacks`` (e.g. the case
    id). Empty names and names that would leave the source folder are dropped."""
    cleaned = clean_text(raw_title)
    names = [
        re.sub(r"[/? ]", "_", raw_title),
        sanitize_name(raw_title),
        raw_title,
        raw_title.strip(),
        sanitize_name(cleaned),
        cleaned,
        *fallbacks,
    ]
    return [n for n in dict.fromkeys(names) if n and ".." not in Path(n).parts and not Path(n).is_absolute()]


def clean_text(text: Any) -> str:
    """HTML entities decoded, whitespace collapsed; non-ASCII kept intact (no ``unicode_escape`` garbling)."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    return " ".join(html.unescape(str(text)).split())


def word_count(text: str) -> int:
    return len(text.split())


def literal_list(cell: Any) -> list[Any]:
    """A list cell written in Python syntax (``"['a', 'b']"``); empty / NaN / unparsable cells give ``[]``."""
    if isinstance(cell, list):
        return cell
    text = "" if cell is None else str(cell).strip()
    if not text or text.lower() in ("nan", "none", "[]"):
        return []
    try:
        value = ast.literal_eval(text)  # a literal parser: never evaluates code
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def read_csv(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """Header and ``(row number, row)`` pairs of a CSV whose cells may hold quotes, commas and newlines."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    fh = path.open(encoding="utf-8-sig", newline="")
    reader = csv.reader(fh)
    try:
        header = next(reader)
    except StopIteration:
        fh.close()
        return [], iter(())

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        with fh:
            for n, row in enumerate(reader):
                yield n, dict(zip(header, row, strict=False))

    return header, rows()


def unique_id(base: str, seen: dict[str, int]) -> str:
    """``base``, or ``base~2``, ``base~3``... when ``base`` was already used (stable for a stable input order)."""
    seen[base] = seen.get(base, 0) + 1
    return base if seen[base] == 1 else f"{base}~{seen[base]}"
