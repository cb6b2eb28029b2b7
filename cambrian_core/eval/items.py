"""One evaluation question (:class:`VQAItem`) and one loaded benchmark split (:class:`EvalSet`)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ANSWER_TYPES", "DataLayoutError", "EvalSet", "VQAItem"]

#: answer types an item may have; ``choice`` items are multiple choice (their ``choices`` are set)
ANSWER_TYPES = ("closed", "open")


class DataLayoutError(ValueError):
    """A benchmark folder or file does not have the layout its loader expects; the message says what is wrong
    and what was expected."""


@dataclass(frozen=True)
class VQAItem:
    """One question about one or more images, with its gold answer.

    Args:
        qid: identifier, unique within the split (stable across runs: predictions are keyed by it).
        images: absolute image paths (any format :func:`~cambrian_core.data.medimage.load_image` reads).
        question: the question text as released.
        answer: the gold answer (always a string; integer answers of the release are converted).
        answer_type: ``closed`` or ``open`` (as the release labels it, normalised).
        question_type: the release's question category (VQA-RAD ``question_type``, SLAKE ``content_type``...).
        choices: ``(("A", text), ...)`` for multiple-choice items; ``answer`` is then the gold letter's text.
        answer_label: the gold letter of a multiple-choice item.
        lang: ``en``, ``zh``...
        meta: release fields kept for breakdowns and error files (organ, modality, phrase type...).
    """

    qid: str
    images: tuple[str, ...]
    question: str
    answer: str
    answer_type: str = "open"
    question_type: str | None = None
    choices: tuple[tuple[str, str], ...] | None = None
    answer_label: str | None = None
    lang: str = "en"
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(
                f"item {self.qid}: answer_type must be one of {ANSWER_TYPES}, got {self.answer_type!r}"
            )
        if self.choices is not None:
            letters = [c[0] for c in self.choices]
            if self.answer_label not in letters:
                raise ValueError(
                    f"item {self.qid}: answer_label {self.answer_label!r} is not one of the choice letters {letters}"
                )

    @property
    def kind(self) -> str:
        """``choice`` for multiple-choice items, else the answer type (``closed`` / ``open``)."""
        return "choice" if self.choices is not None else self.answer_type

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (for error files and the hook's logs)."""
        out: dict[str, Any] = {
            "qid": self.qid,
            "images": list(self.images),
            "question": self.question,
            "answer": self.answer,
            "answer_type": self.answer_type,
            "question_type": self.question_type,
            "lang": self.lang,
        }
        if self.choices is not None:
            out["choices"] = {k: v for k, v in self.choices}
            out["answer_label"] = self.answer_label
        if self.meta:
            out["meta"] = dict(self.meta)
        return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class EvalSet:
    """The items of one benchmark split plus the annotation files they came from (hashed into the results)."""

    benchmark: str
    split: str
    items: list[VQAItem]
    sources: Sequence[Path] = ()
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen: dict[str, int] = {}
        for i, item in enumerate(self.items):
            if item.qid in seen:
                raise DataLayoutError(
                    f"{self.benchmark}/{self.split}: question id {item.qid!r} occurs twice (rows {seen[item.qid]} "
                    f"and {i}); ids must be unique so predictions can be matched to questions"
                )
            seen[item.qid] = i

    def __len__(self) -> int:
        return len(self.items)

    def source_hashes(self) -> dict[str, str]:
        """``{file name: sha256}`` of every annotation file the split was read from."""
        return {Path(p).name: _sha256(Path(p)) for p in self.sources}

    def limit(self, n: int | None) -> EvalSet:
        """The first ``n`` items (all when ``n`` is ``None``)."""
        if n is None:
            return self
        if n < 1:
            raise ValueError(f"limit must be >= 1, got {n}")
        return EvalSet(self.benchmark, self.split, self.items[:n], self.sources, list(self.notes))
