"""PathVQA from the original release (``pvqa/``).

* ``qas/<split>/<split>_qa.pkl``: a pickled list of ``{"image", "question", "answer"}`` dicts, ``image`` being the
  file stem (``"val_0261"``, no ``.jpg``); read first.
* ``qas/<split>_vqa.pkl`` (LXMERT style): ``{"img_id", "question_id", "sent", "label": {answer: score}}``; used
  when the first is absent (the highest-scored label is the answer).
* ``images/<split>/<stem>.jpg`` with splits ``train`` / ``val`` / ``test`` (``validation`` is an alias).

Pickles are read by a data-only unpickler (no code from the file runs). Yes/no answers are closed, the rest open
(the convention LLaVA-Med's counts follow); the question type is the question's first word (``what``, ``is``...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cambrian_core.eval.items import DataLayoutError, EvalSet, VQAItem
from cambrian_core.eval.loaders.common import (
    check_images,
    locate,
    require,
    safe_unpickle,
    split_name,
    unique_ids,
)

__all__ = ["SPLITS", "load"]

NAME = "pathvqa"
SPLITS = ("train", "val", "test")
_HINT = (
    "the pvqa folder: qas/<split>/<split>_qa.pkl (or qas/<split>_vqa.pkl) and images/<split>/<split>_NNNN.jpg"
)


def _first_word(question: str) -> str | None:
    words = question.strip().split()
    return words[0].lower().strip("?,.:;") if words else None


def _rows(folder: Path, split: str) -> tuple[Path, list[tuple[str, str, str, str]]]:
    """``(file, [(qid, image stem, question, answer)])``."""
    qa = folder / "qas" / split / f"{split}_qa.pkl"
    vqa = folder / "qas" / f"{split}_vqa.pkl"
    if qa.is_file():
        data = safe_unpickle(qa, NAME)
        if not isinstance(data, list):
            raise DataLayoutError(f"{NAME}: {qa} must hold a list of dicts, got {type(data).__name__}")
        out = []
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataLayoutError(f"{NAME}: {qa.name} entry {i} is a {type(row).__name__}, not a dict")
            require(row, ("image", "question", "answer"), f"{qa.name} entry {i}")
            out.append((f"{split}_{i:05d}", str(row["image"]), str(row["question"]), str(row["answer"])))
        return qa, out
    if vqa.is_file():
        data = safe_unpickle(vqa, NAME)
        if not isinstance(data, list):
            raise DataLayoutError(f"{NAME}: {vqa} must hold a list of dicts, got {type(data).__name__}")
        out = []
        for i, row in enumerate(data):
            require(row, ("img_id", "sent", "label"), f"{vqa.name} entry {i}")
            labels: dict[str, Any] = row["label"] or {}
            if not labels:
                raise DataLayoutError(f"{NAME}: {vqa.name} entry {i} has no answer label")
            answer = max(labels, key=lambda a: float(labels[a]))
            qid = str(row.get("question_id", f"{split}_{i:05d}"))
            out.append((qid, str(row["img_id"]), str(row["sent"]), str(answer)))
        return vqa, out
    raise DataLayoutError(f"{NAME}: neither {qa} nor {vqa} exists ({_HINT})")


def load(root: str | Path, split: str = "test") -> EvalSet:
    """Load PathVQA ``split`` (``train`` / ``val`` / ``test``) from the ``pvqa`` folder (or a folder holding it)."""
    split = split_name(split, SPLITS, NAME)
    folder = locate(root, ["qas"], NAME, _HINT)
    path, rows = _rows(folder, split)
    ids, renamed = unique_ids([r[0] for r in rows])
    images = folder / "images" / split
    items = []
    for (_, stem, question, answer), qid in zip(rows, ids, strict=True):
        stem = stem.strip()
        name = stem if stem.lower().endswith((".jpg", ".jpeg", ".png")) else f"{stem}.jpg"
        answer = answer.strip()
        items.append(
            VQAItem(
                qid=qid,
                images=(str(images / name),),
                question=question.strip(),
                answer=answer,
                answer_type="closed" if answer.lower() in ("yes", "no") else "open",
                question_type=_first_word(question),
                meta={"image": stem},
            )
        )
    notes = ["answer type: yes/no answers are closed, all others open"]
    if renamed:
        notes.append(f"{renamed} repeated question id(s) were suffixed with #N to keep ids unique")
    check_images(items, NAME, images)
    return EvalSet(NAME, split, items, [path], notes)
