"""Helpers shared by the benchmark loaders: finding the release folder, reading files with clear errors,
normalising labels, checking images."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cambrian_core.eval.items import DataLayoutError, VQAItem

__all__ = [
    "answer_type_of",
    "check_images",
    "locate",
    "read_json_array",
    "safe_unpickle",
    "split_name",
    "text_or_none",
    "unique_ids",
]

#: names people use for the validation split
_VAL_ALIASES = ("val", "validate", "validation", "dev")


def locate(root: str | Path, markers: Sequence[str], benchmark: str, hint: str) -> Path:
    """The folder holding any of ``markers``: ``root`` itself or one of its direct subfolders.

    Raises:
        DataLayoutError: no such folder (the message lists what was looked for and ``hint``).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataLayoutError(f"{benchmark}: data folder {root} does not exist ({hint})")
    if any((root / m).exists() for m in markers):
        return root
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if any((child / m).exists() for m in markers):
            return child
    raise DataLayoutError(
        f"{benchmark}: none of {list(markers)} found in {root} or its subfolders; expected {hint}"
    )


def split_name(split: str, known: Sequence[str], benchmark: str) -> str:
    """Canonical split name: validation aliases map to whichever of them ``known`` uses."""
    s = split.strip().lower()
    if s in known:
        return s
    if s in _VAL_ALIASES:
        for alias in _VAL_ALIASES:
            if alias in known:
                return alias
    raise DataLayoutError(f"{benchmark} has no split {split!r}; splits: {', '.join(known)}")


def read_json_array(path: Path, benchmark: str) -> list[dict[str, Any]]:
    """A JSON file holding one top-level array of objects."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise DataLayoutError(f"{benchmark}: cannot read {path} as JSON ({exc})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataLayoutError(
            f"{benchmark}: {path} must hold one JSON array of objects, got {type(data).__name__}"
        )
    return data


def require(row: dict[str, Any], keys: Iterable[str], where: str) -> None:
    """Raise when ``row`` lacks any of ``keys``."""
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataLayoutError(f"{where} lacks the field(s) {missing}; it has {sorted(row)}")


def text_or_none(value: Any) -> str | None:
    """A text field, with the release's ``"NULL"`` / empty markers as ``None``."""
    if value is None:
        return None
    text = str(value).strip()
    return None if text in ("", "NULL", "null", "None") else text


def answer_type_of(value: Any, where: str) -> str:
    """``closed`` / ``open`` from a release label (``"CLOSED "`` with a stray space included)."""
    text = str(value).strip().lower()
    if text in ("closed", "close", "yes/no"):
        return "closed"
    if text == "open":
        return "open"
    raise DataLayoutError(f"{where}: answer_type {value!r} is neither OPEN nor CLOSED")


def unique_ids(ids: Sequence[str]) -> tuple[list[str], int]:
    """Ids made unique by suffixing repeats with ``#2``, ``#3``...; returns them and how many were renamed."""
    counts: Counter[str] = Counter()
    out, renamed = [], 0
    for qid in ids:
        counts[qid] += 1
        if counts[qid] > 1:
            out.append(f"{qid}#{counts[qid]}")
            renamed += 1
        else:
            out.append(qid)
    return out, renamed


def check_images(items: Sequence[VQAItem], benchmark: str, folder: Path) -> None:
    """Raise when images referenced by the items are missing (names the first few and the folder)."""
    missing = sorted({p for it in items for p in it.images if not Path(p).is_file()})
    if missing:
        shown = ", ".join(Path(p).name for p in missing[:5])
        raise DataLayoutError(
            f"{benchmark}: {len(missing)} referenced image(s) are missing under {folder} (e.g. {shown}); "
            "unpack the release's image archive there"
        )


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data (lists, dicts, strings, numbers, numpy scalars) and refuses everything else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "dtype"),
        ("codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: annotation pickles may only hold plain data"
        )


def _plain(value: Any) -> Any:
    """numpy scalars -> python values, recursively."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and type(value).__module__ == "numpy":
        return value.item()
    return value


def safe_unpickle(path: Path, benchmark: str) -> Any:
    """Load a pickle of plain data without executing arbitrary code (no classes or functions are built)."""
    try:
        with open(path, "rb") as f:
            return _plain(_DataOnlyUnpickler(f, encoding="latin1").load())
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataLayoutError(f"{benchmark}: cannot read {path} ({exc})") from None
