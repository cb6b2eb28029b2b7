"""Private sets: a JSONL file (one question per line) or a JSON array, flat or in LLaVA-Med's question format.

``data`` is the file itself, or a folder holding ``<split>.jsonl`` / ``<split>.json``. Per record:

* id: ``question_id``, ``qid`` or ``id`` (default: the line number);
* images: ``image`` (string) or ``images`` (list), relative to ``image_folder`` (default: the file's folder);
* question / answer: ``question`` (or ``text``) and ``answer``, or LLaVA ``conversations`` (``conversatons`` is
  accepted too): turn 0 is the question (its ``<image>`` markers are removed), turn 1 the answer;
* ``answer_type``: ``closed`` / ``open`` (any case, stray spaces allowed); default: closed for yes/no answers;
* optional ``question_type``, ``lang``, and ``choices`` (``{"A": text, ...}`` or a list lettered A, B, ...) with
  ``answer_label`` (or a one-letter ``answer``) for multiple choice; ``answer`` may then be left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cambrian_core.eval.items import DataLayoutError, EvalSet, VQAItem
from cambrian_core.eval.loaders.common import answer_type_of, check_images, text_or_none
from cambrian_core.fileio import jsonl_lines

__all__ = ["load", "parse_record"]

NAME = "jsonl"
_IMAGE_MARK = "<image>"


def _records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DataLayoutError(f"{NAME}: {path} is not valid JSON ({exc})") from None
        return list(enumerate(data, start=1))
    out = []
    for n, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except ValueError as exc:
            raise DataLayoutError(f"{NAME}: {path} line {n} is not valid JSON ({exc})") from None
    return out


def _choices(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if isinstance(value, dict):
        pairs = [(str(k).strip().upper(), str(v).strip()) for k, v in value.items()]
    elif isinstance(value, list):
        pairs = [(chr(ord("A") + i), str(v).strip()) for i, v in enumerate(value)]
    else:
        raise DataLayoutError(
            f"{where}: choices must be an object {{letter: text}} or a list, got {type(value).__name__}"
        )
    if len(pairs) < 2:
        raise DataLayoutError(f"{where}: choices need at least two options")
    return tuple(pairs)


def parse_record(record: dict[str, Any], where: str, image_folder: Path, index: int) -> VQAItem:
    """One record -> :class:`VQAItem` (see the module docstring for the accepted fields)."""
    if not isinstance(record, dict):
        raise DataLayoutError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    conv = record.get("conversations", record.get("conversatons"))
    question = record.get("question", record.get("text"))
    answer = record.get("answer")
    if conv is not None:
        if not isinstance(conv, list) or len(conv) < 2:
            raise DataLayoutError(f"{where}: conversations must hold the question turn and the answer turn")
        question = question if question is not None else conv[0].get("value")
        answer = answer if answer is not None else conv[1].get("value")
    if answer is None and record.get("choices") is not None and record.get("answer_label") is not None:
        answer = ""  # multiple choice: the gold letter's text is filled in below
    if question is None or answer is None:
        raise DataLayoutError(
            f"{where}: needs `question` and `answer` (or LLaVA `conversations`); it has {sorted(record)}"
        )
    question = " ".join(str(question).replace(_IMAGE_MARK, " ").split())
    answer = str(answer).strip()
    images = record.get("images", record.get("image"))
    if images is None:
        paths: tuple[str, ...] = ()
    else:
        names = [images] if isinstance(images, str) else list(images)
        paths = tuple(str(p if (p := Path(str(n))).is_absolute() else image_folder / p) for n in names)
    choices = answer_label = None
    if record.get("choices") is not None:
        choices = _choices(record["choices"], where)
        label = str(record.get("answer_label") or "").strip().upper()
        letters = [c[0] for c in choices]
        if not label and answer.strip().upper() in letters:
            label = answer.strip().upper()
        if label not in letters:
            raise DataLayoutError(
                f"{where}: multiple-choice record needs answer_label in {letters}, got {label!r}"
            )
        answer_label, answer = label, dict(choices)[label]
    raw_type = record.get("answer_type")
    if raw_type is not None:
        answer_type = answer_type_of(raw_type, where)
    else:
        answer_type = "closed" if choices is not None or answer.lower() in ("yes", "no") else "open"
    qid = record.get("question_id", record.get("qid", record.get("id", index)))
    return VQAItem(
        qid=str(qid),
        images=paths,
        question=question,
        answer=answer,
        answer_type=answer_type,
        question_type=text_or_none(record.get("question_type")),
        choices=choices,
        answer_label=answer_label,
        lang=str(record.get("lang") or "en"),
        meta=dict(record.get("meta") or {}),
    )


def load(
    root: str | Path, split: str = "test", image_folder: str | Path | None = None, name: str | None = None
) -> EvalSet:
    """Load a private set from a JSONL / JSON file, or ``<split>.jsonl`` / ``<split>.json`` in a folder."""
    root = Path(root).expanduser()
    if root.is_file():
        path = root
    elif root.is_dir():
        path = next(
            (root / f"{split}{ext}" for ext in (".jsonl", ".json") if (root / f"{split}{ext}").is_file()),
            None,
        )
        if path is None:
            found = sorted(p.name for p in root.glob("*.json*"))
            raise DataLayoutError(
                f"{NAME}: no {split}.jsonl or {split}.json in {root}; found: {found or 'nothing'}"
            )
    else:
        raise DataLayoutError(f"{NAME}: {root} does not exist")
    folder = Path(image_folder).expanduser() if image_folder is not None else path.parent
    items = [parse_record(rec, f"{path.name} record {n}", folder, n) for n, rec in _records(path)]
    if not items:
        raise DataLayoutError(f"{NAME}: {path} holds no records")
    check_images(items, NAME, folder)
    return EvalSet(name or NAME, split, items, [path])
