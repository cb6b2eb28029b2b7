"""VQA-RAD from either public layout.

* OSF release: ``VQA_RAD Dataset Public.json`` (one array of 14-key rows) and ``VQA_RAD Image Folder/``. The
  official test set is the rows whose ``phrase_type`` starts with ``test`` (``test_freeform`` / ``test_para``,
  451 questions); the others are train. Framed questions live in ``question_frame`` of their source row and are
  kept in ``meta`` (they are not separate questions).
* MEVF ``data_RAD`` (used by MEVF and LLaVA-Med): ``trainset.json`` / ``testset.json`` (8-key rows, framed
  questions are rows there) and ``images/``.

Quirks handled: integer answers become strings, ``"CLOSED "`` (trailing space) is closed, ``"NULL"`` text is
absent, question types are upper-cased with the release's typos mapped (``ATRIB``, ``PRSE``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

__all__ = ["LAYOUTS", "SPLITS", "load"]

NAME = "vqa_rad"
OSF_JSON = "VQA_RAD Dataset Public.json"
OSF_IMAGES = "VQA_RAD Image Folder"
MEVF_FILES = {"train": "trainset.json", "test": "testset.json"}
MEVF_IMAGES = "images"
SPLITS = ("train", "test")
LAYOUTS = ("auto", "osf", "mevf")
_QTYPE_FIXES = {"ATRIB": "ATTRIB", "PRSE": "PRES"}
_HINT = f"the OSF release ({OSF_JSON!r} + {OSF_IMAGES!r}/) or MEVF data_RAD (trainset.json, testset.json, images/)"


def question_type(value: Any) -> str | None:
    """Canonical VQA-RAD question type: upper case, typos fixed, comma-joined pairs as ``"PRES, POS"``."""
    text = text_or_none(value)
    if text is None:
        return None
    parts = [p.strip().upper() for p in text.split(",") if p.strip()]
    return ", ".join(_QTYPE_FIXES.get(p, p) for p in parts) or None


def _item(row: dict[str, Any], qid: str, images: Path, where: str, extra: dict[str, Any]) -> VQAItem:
    require(row, ("image_name", "question", "answer", "answer_type"), where)
    meta = {
        "organ": text_or_none(row.get("image_organ")),
        "phrase_type": text_or_none(row.get("phrase_type")),
    }
    meta.update(extra)
    return VQAItem(
        qid=qid,
        images=(str(images / str(row["image_name"]).strip()),),
        question=str(row["question"]).strip(),
        answer=str(row["answer"]).strip(),
        answer_type=answer_type_of(row["answer_type"], where),
        question_type=question_type(row.get("question_type")),
        meta={k: v for k, v in meta.items() if v is not None},
    )


def _load_osf(folder: Path, split: str) -> EvalSet:
    path = folder / OSF_JSON
    rows = read_json_array(path, NAME)
    chosen = [
        (i, r)
        for i, r in enumerate(rows)
        if str(r.get("phrase_type", "")).strip().lower().startswith("test") == (split == "test")
    ]
    ids, renamed = unique_ids([str(r.get("qid", i)).strip() for i, r in chosen])
    images = folder / OSF_IMAGES
    items = [
        _item(
            r,
            qid,
            images,
            f"{path.name} row {i}",
            {
                "question_frame": text_or_none(r.get("question_frame")),
                "question_rephrase": text_or_none(r.get("question_rephrase")),
            },
        )
        for (i, r), qid in zip(chosen, ids, strict=True)
    ]
    notes = ["layout: OSF release (official 451-question test = test_freeform + test_para rows)"]
    if renamed:
        notes.append(f"{renamed} repeated qid(s) were suffixed with #N to keep ids unique")
    check_images(items, NAME, images)
    return EvalSet(NAME, split, items, [path], notes)


def _load_mevf(folder: Path, split: str) -> EvalSet:
    path = folder / MEVF_FILES[split]
    if not path.is_file():
        raise DataLayoutError(
            f"{NAME}: {path} is missing (MEVF data_RAD layout: trainset.json, testset.json)"
        )
    rows = read_json_array(path, NAME)
    ids, renamed = unique_ids([str(r.get("qid", i)).strip() for i, r in enumerate(rows)])
    images = folder / MEVF_IMAGES
    items = [
        _item(r, qid, images, f"{path.name} row {i}", {})
        for i, (r, qid) in enumerate(zip(rows, ids, strict=True))
    ]
    notes = ["layout: MEVF data_RAD (the split LLaVA-Med reports on)"]
    if renamed:
        notes.append(f"{renamed} repeated qid(s) were suffixed with #N to keep ids unique")
    check_images(items, NAME, images)
    return EvalSet(NAME, split, items, [path], notes)


def load(root: str | Path, split: str = "test", layout: str = "auto") -> EvalSet:
    """Load VQA-RAD ``split`` (``train`` / ``test``) from ``root``.

    Args:
        root: the release folder (or a folder holding it).
        split: ``train`` or ``test``.
        layout: ``osf``, ``mevf`` or ``auto`` (the OSF release when both are present).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"{NAME}: layout must be one of {LAYOUTS}, got {layout!r}")
    split = split_name(split, SPLITS, NAME)
    markers = {"osf": [OSF_JSON], "mevf": list(MEVF_FILES.values()), "auto": [OSF_JSON, *MEVF_FILES.values()]}
    folder = locate(root, markers[layout], NAME, _HINT)
    if layout == "osf" or (layout == "auto" and (folder / OSF_JSON).is_file()):
        return _load_osf(folder, split)
    return _load_mevf(folder, split)
