"""SLAKE (``Slake1.0``): ``train.json``, ``validate.json`` (``validation.json`` in the Hugging Face upload),
``test.json`` and ``imgs/xmlab<N>/source.jpg``.

Each split file is one array of 12-key rows whose key order varies (rows are read by name). English and Chinese
rows share the files (``q_lang`` ``en`` / ``zh``); ``lang`` picks one or both. ``content_type`` (Organ, Position,
Abnormality, KG...) is the question type; ``answer_type`` OPEN / CLOSED also labels Chinese rows. CLOSED is not
only yes/no ("Left", "T2", ...).
"""

from __future__ import annotations

from pathlib import Path

from cambrian_core.eval.items import DataLayoutError, EvalSet, VQAItem
from cambrian_core.eval.loaders.common import (
    answer_type_of,
    check_images,
    locate,
    read_json_array,
    require,
    split_name,
    text_or_none,
    unique_ids,
)

__all__ = ["LANGS", "SPLITS", "load"]

NAME = "slake"
SPLITS = ("train", "validate", "test")
LANGS = ("en", "zh", "all")
_FILES = {"train": ("train.json",), "validate": ("validate.json", "validation.json"), "test": ("test.json",)}
_HINT = "the Slake1.0 folder: train.json, validate.json (or validation.json), test.json and imgs/xmlab<N>/source.jpg"


def load(root: str | Path, split: str = "test", lang: str = "en") -> EvalSet:
    """Load SLAKE ``split`` (``train`` / ``validate`` / ``test``; ``val`` and ``validation`` are aliases).

    Args:
        root: the ``Slake1.0`` folder (or a folder holding it).
        split: which split file.
        lang: ``en`` (the usual English benchmark), ``zh`` or ``all``.
    """
    if lang not in LANGS:
        raise ValueError(f"{NAME}: lang must be one of {LANGS}, got {lang!r}")
    split = split_name(split, SPLITS, NAME)
    folder = locate(root, [f for names in _FILES.values() for f in names], NAME, _HINT)
    path = next((folder / f for f in _FILES[split] if (folder / f).is_file()), None)
    if path is None:
        raise DataLayoutError(f"{NAME}: {' or '.join(_FILES[split])} is missing in {folder} ({_HINT})")
    rows = read_json_array(path, NAME)
    chosen = []
    for i, row in enumerate(rows):
        where = f"{path.name} row {i}"
        require(row, ("img_name", "question", "answer", "q_lang", "answer_type"), where)
        row_lang = str(row["q_lang"]).strip().lower()
        if lang == "all" or row_lang == lang:
            chosen.append((i, row, row_lang))
    ids, renamed = unique_ids([str(r.get("qid", i)).strip() for i, r, _ in chosen])
    images = folder / "imgs"
    items = []
    for (i, row, row_lang), qid in zip(chosen, ids, strict=True):
        meta = {
            k: text_or_none(row.get(k))
            for k in ("modality", "location", "base_type")
            if text_or_none(row.get(k))
        }
        if "img_id" in row:
            meta["img_id"] = row["img_id"]
        items.append(
            VQAItem(
                qid=qid,
                images=(str(images / str(row["img_name"]).strip()),),
                question=str(row["question"]).strip(),
                answer=str(row["answer"]).strip(),
                answer_type=answer_type_of(row["answer_type"], f"{path.name} row {i}"),
                question_type=text_or_none(row.get("content_type")),
                lang=row_lang,
                meta=meta,
            )
        )
    notes = [f"languages: {lang}"]
    if renamed:
        notes.append(f"{renamed} repeated qid(s) were suffixed with #N to keep ids unique")
    check_images(items, NAME, images)
    return EvalSet(NAME if lang == "en" else f"{NAME}_{lang}", split, items, [path], notes)
