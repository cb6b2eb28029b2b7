"""PMC-VQA multiple choice from the Hugging Face release CSVs.

* v1 (``train.csv``, ``test.csv``, ``test_clean.csv``; images in ``images/``): columns ``Figure_path, Question,
  Answer, Choice A..D, Answer_label``; the gold letter is ``Answer_label`` and ``Answer`` is the option text
  (spelt ``Anwser`` in early revisions).
* v2 (``train_2.csv``, ``test_2.csv``; images in ``figures/`` or ``images/``): ``index, Figure_path, Caption,
  Question, Choice A..D, Answer, split``; here ``Answer`` holds the gold letter.

Choice cells carry an ``X:`` prefix, sometimes padded (``" B: CT scan "``); it is removed. Cells with commas are
quoted (the csv module reads them). The default split is ``test_clean`` (the 2,000 human-checked questions).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from cambrian_core.eval.items import DataLayoutError, EvalSet, VQAItem
from cambrian_core.eval.loaders.common import check_images, locate, unique_ids

__all__ = ["SPLITS", "load", "strip_choice_prefix"]

NAME = "pmc_vqa"
#: split -> candidate file names (the README spells v2 without the underscore)
_FILES = {
    "test_clean": ("test_clean.csv",),
    "test": ("test.csv",),
    "train": ("train.csv",),
    "test_2": ("test_2.csv", "test2.csv"),
    "train_2": ("train_2.csv", "train2.csv"),
}
SPLITS = tuple(_FILES)
_IMAGE_DIRS = {"v1": ("images",), "v2": ("figures", "images_2", "images2", "images")}
_LETTERS = ("A", "B", "C", "D")
_CHOICE_COL = re.compile(r"^\s*choice[\s_]*([a-d])\s*$", re.IGNORECASE)
_PREFIX = re.compile(r"^\s*([A-Da-d])\s*[:：]\s*")
_HINT = "PMC-VQA CSVs (test_clean.csv, test.csv, train.csv, test_2.csv, train_2.csv) with images/ or figures/"


def strip_choice_prefix(cell: str) -> str:
    """``" B: CT scan "`` -> ``"CT scan"`` (one ``X:`` prefix and the padding)."""
    return _PREFIX.sub("", cell.strip(), count=1).strip()


def _choice_columns(header: list[str], version: str, path: Path) -> list[str]:
    named = {m[1].upper(): col for col in header if (m := _CHOICE_COL.match(col))}
    if all(k in named for k in _LETTERS):
        return [named[k] for k in _LETTERS]
    if version == "v1" and len(header) >= 6:
        return header[-5:-1]  # the four columns before Answer_label
    if version == "v2" and "Question" in header and len(header) >= header.index("Question") + 5:
        q = header.index("Question")
        return header[q + 1 : q + 5]
    raise DataLayoutError(f"{NAME}: cannot find the four choice columns in {path.name}; header: {header}")


def _image_dir(folder: Path, version: str, image_dir: str | Path | None) -> Path:
    if image_dir is not None:
        path = Path(image_dir)
        path = path if path.is_absolute() else folder / path
        if not path.is_dir():
            raise DataLayoutError(f"{NAME}: image_dir {path} does not exist")
        return path
    for name in _IMAGE_DIRS[version]:
        if (folder / name).is_dir():
            return folder / name
    raise DataLayoutError(
        f"{NAME}: no image folder for the {version} CSVs in {folder}; looked for {list(_IMAGE_DIRS[version])} "
        "(unzip the release's images there, or pass image_dir)"
    )


def load(root: str | Path, split: str = "test_clean", image_dir: str | Path | None = None) -> EvalSet:
    """Load PMC-VQA ``split`` (``test_clean``, ``test``, ``train``, ``test_2``, ``train_2``) from ``root``."""
    key = split.strip().lower().replace("-", "_")
    key = {"test2": "test_2", "train2": "train_2"}.get(key, key)
    if key not in _FILES:
        raise DataLayoutError(f"{NAME} has no split {split!r}; splits: {', '.join(SPLITS)}")
    folder = locate(root, [f for names in _FILES.values() for f in names], NAME, _HINT)
    path = next((folder / f for f in _FILES[key] if (folder / f).is_file()), None)
    if path is None:
        raise DataLayoutError(f"{NAME}: {' or '.join(_FILES[key])} is missing in {folder}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        rows = list(reader)
    version = "v1" if "Answer_label" in header else "v2"
    need = ["Figure_path", "Question", "Answer_label" if version == "v1" else "Answer"]
    missing = [c for c in need if c not in header]
    if missing:
        raise DataLayoutError(f"{NAME}: {path.name} lacks the column(s) {missing}; header: {header}")
    choice_cols = _choice_columns(header, version, path)
    gold_col = "Answer_label" if version == "v1" else "Answer"
    images = _image_dir(folder, version, image_dir)
    raw_ids = [
        str(r["index"]).strip() if version == "v2" and str(r.get("index") or "").strip() else f"{key}-{i}"
        for i, r in enumerate(rows)
    ]
    ids, renamed = unique_ids(raw_ids)
    items = []
    for i, (row, qid) in enumerate(zip(rows, ids, strict=True)):
        where = f"{path.name} row {i + 2}"  # +1 header, +1 one-based
        choices = tuple(
            (letter, strip_choice_prefix(row.get(col) or ""))
            for letter, col in zip(_LETTERS, choice_cols, strict=True)
        )
        gold = str(row.get(gold_col) or "").strip().rstrip(":：").strip().upper()
        if gold not in _LETTERS:
            raise DataLayoutError(
                f"{NAME}: {where}: gold letter column {gold_col} holds {row.get(gold_col)!r}, not A-D"
            )
        meta = {"figure": str(row["Figure_path"]).strip(), "version": version}
        if version == "v2" and row.get("split"):
            meta["split"] = str(row["split"]).strip()
        items.append(
            VQAItem(
                qid=qid,
                images=(str(images / str(row["Figure_path"]).strip()),),
                question=str(row["Question"]).strip(),
                answer=dict(choices)[gold],
                answer_type="closed",
                question_type=None,
                choices=choices,
                answer_label=gold,
                meta=meta,
            )
        )
    notes = [f"format: {version} ({path.name}); gold letter from {gold_col}"]
    if renamed:
        notes.append(f"{renamed} repeated index value(s) were suffixed with #N to keep ids unique")
    check_images(items, NAME, images)
    return EvalSet(NAME, key, items, [path], notes)
