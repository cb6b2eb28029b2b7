"""Reading, writing and inspecting LLaVA-format records (the converters' and the trainer's exchange format).

A record is ``{"id", "image": str | [str, ...] (optional), "conversations": [{"from": "human"|"gpt", "value"}],
"stage", "provenance"}`` (reference §A.12). Image paths are relative to the folder of the file holding them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cambrian_core.model.template import IMAGE_TOKEN

__all__ = [
    "IMAGE_TOKEN",
    "conversation_problem",
    "iter_records",
    "rebase_images",
    "record_images",
    "write_jsonl",
]

_TEXT_ONLY = {"", "none", "nan", "null"}


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Yield ``(line_or_index, record)`` from a JSONL file or a JSON array; a bad line yields an error string."""
    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "nothing"
        raise FileNotFoundError(
            f"no record file at {path} ({what} there; expected LLaVA JSONL or a JSON array)"
        )
    try:
        yield from _iter_text_records(path)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not a UTF-8 text record file (byte {exc.start}: {exc.reason}); expected LLaVA JSONL or a "
            "JSON array, not an image or archive"
        ) from None


def _iter_text_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with path.open(encoding="utf-8-sig") as fh:  # -sig: a byte-order mark (Windows tools) is not content
        head = fh.read(1 << 12).lstrip()
        fh.seek(0)
        if head.startswith("["):
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not a valid JSON array ({exc})") from None
            for i, rec in enumerate(data):
                yield (
                    i,
                    rec if isinstance(rec, dict) else f"item {i} is a {type(rec).__name__}, not an object",
                )
            return
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, f"line {lineno} is not valid JSON ({exc.msg})"
                continue
            yield (
                lineno,
                rec if isinstance(rec, dict) else f"line {lineno} is a {type(rec).__name__}, not an object",
            )


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` as UTF-8 JSONL (non-ASCII kept as is); returns the count."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def record_images(record: dict[str, Any]) -> list[str]:
    """The record's image paths as a list (empty for text-only records)."""
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [] if image.strip().lower() in _TEXT_ONLY else [image]
    if isinstance(image, list):
        return [str(p) for p in image]
    return [str(image)]


def rebase_images(record: dict[str, Any], src_root: Path, dst_root: Path) -> dict[str, Any]:
    """A copy of ``record`` whose relative image paths (relative to ``src_root``) are relative to ``dst_root``."""
    images = record_images(record)
    if not images or src_root.resolve() == dst_root.resolve():
        return record
    moved = []
    for p in images:
        full = p if os.path.isabs(p) else os.path.normpath(src_root / p)
        moved.append(os.path.relpath(full, dst_root))
    out = dict(record)
    out["image"] = moved if isinstance(record.get("image"), list) else moved[0]
    return out


def conversation_problem(record: dict[str, Any]) -> str | None:
    """Why ``record``'s conversation is not trainable, or ``None`` when it is.

    Checks: a non-empty ``conversations`` list of ``{"from", "value"}`` turns; roles ``human``/``gpt`` alternating
    and starting with ``human``; no empty turn; exactly one ``<image>`` per image, all in human turns.
    """
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "`conversations` is missing or empty"
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            keys = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            return f"turn {i} must be an object with `from` and `value` (got {keys})"
        expected = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != expected:
            return f"turn {i} is from {turn['from']!r}, expected {expected!r} (roles alternate, starting with human)"
        if not isinstance(turn["value"], str) or not turn["value"].replace(IMAGE_TOKEN, "").strip():
            return f"turn {i} ({turn['from']}) is empty"
    if len(conv) % 2:
        return "the conversation ends with a human turn (no gpt answer)"
    n_images = len(record_images(record))
    tokens = sum(t["value"].count(IMAGE_TOKEN) for t in conv)
    if tokens != n_images:
        return f"{tokens} {IMAGE_TOKEN} token(s) for {n_images} image(s)"
    if any(IMAGE_TOKEN in t["value"] for t in conv if t["from"] == "gpt"):
        return f"a gpt turn holds {IMAGE_TOKEN}"
    return None
