"""Scorers that reproduce published protocols, for comparison with published numbers only.

They are lenient in documented ways and are always reported apart from the strict metrics (``family`` is the
protocol's name):

* LLaVA-Med v1.0 (``run_eval_batch.py`` route; vqa_formats.md §6): both strings go through
  :func:`~cambrian_core.eval.normalize.llava_med_normalize`; a closed item is a hit when the normalised gold is a
  **substring** of the normalised prediction (so gold ``"no"`` hits ``"nodule"``, ``"normal"``, ``"not seen"``);
  "open accuracy" applies the same substring test to open items; open "recall" is its unigram recall. Unlike the
  original, items whose released ``answer_type`` carries a stray space are not dropped (the loaders normalise it).
* PMC-VQA MedVInT-TE (``test.py``): the predicted letter is the one of A-D whose ``difflib`` similarity ratio to the
  generated text is highest (ties keep the first); no normalisation.
"""

from __future__ import annotations

import difflib
from collections import Counter

from cambrian_core.eval.items import VQAItem
from cambrian_core.eval.metrics import Metric
from cambrian_core.eval.normalize import llava_med_normalize

__all__ = [
    "COMPAT_METRICS",
    "LlavaMedClosed",
    "LlavaMedOpenRecall",
    "LlavaMedOpenSubstring",
    "PmcVqaChoice",
    "llava_med_recall",
    "medvint_letter",
]


def llava_med_recall(prediction: str, answer: str) -> float:
    """LLaVA-Med's token recall: tp = prediction counts of shared words, fn = gold counts of gold-only words."""
    p = Counter(llava_med_normalize(prediction).split())
    g = Counter(llava_med_normalize(answer).split())
    if not p or not g:
        return 0.0
    tp = sum(n for w, n in p.items() if w in g)
    fn = sum(n for w, n in g.items() if w not in p)
    return tp / (tp + fn) if tp else 0.0


def _substring_hit(prediction: str, answer: str) -> float:
    return float(llava_med_normalize(answer) in llava_med_normalize(prediction))


class LlavaMedClosed(Metric):
    name = "llava_med_closed"
    label = "closed accuracy (LLaVA-Med substring)"
    kind = "closed"
    family = "llava_med"
    description = "LLaVA-Med-compatible: normalised gold is a substring of the normalised prediction"

    def score(self, prediction: str, item: VQAItem) -> float:
        return _substring_hit(prediction, item.answer)


class LlavaMedOpenSubstring(Metric):
    name = "llava_med_open_substring"
    label = "open accuracy (LLaVA-Med substring)"
    kind = "open"
    family = "llava_med"
    description = (
        "LLaVA-Med-compatible 'open accuracy' of run_eval_batch: the same substring test on open items"
    )

    def score(self, prediction: str, item: VQAItem) -> float:
        return _substring_hit(prediction, item.answer)


class LlavaMedOpenRecall(Metric):
    name = "llava_med_open_recall"
    label = "open recall (LLaVA-Med)"
    kind = "open"
    family = "llava_med"
    description = "LLaVA-Med-compatible open-set recall (the paper's 'open' column) on its normalised words"

    def score(self, prediction: str, item: VQAItem) -> float:
        return llava_med_recall(prediction, item.answer)


def medvint_letter(text: str, letters: tuple[str, ...] = ("A", "B", "C", "D")) -> str | None:
    """The letter most similar to ``text`` by ``difflib`` ratio, as MedVInT-TE's ``find_most_similar_index``.

    The ratio is ``SequenceMatcher(None, letter, text)`` (that argument order: with ``text`` second, difflib's
    junk heuristic applies to a generation of 200+ characters as it does there); strictly greater wins, ties
    keep the first letter, and a text with no positive ratio to any letter (empty, a failed generation, no
    capital A-D) gets ``None``: no letter, scored wrong against any gold letter.
    """
    best, best_ratio = None, 0.0
    for letter in letters:
        ratio = difflib.SequenceMatcher(None, letter, text).ratio()
        if ratio > best_ratio:
            best, best_ratio = letter, ratio
    return best


class PmcVqaChoice(Metric):
    name = "pmc_vqa_choice"
    label = "choice accuracy (PMC-VQA MedVInT-TE)"
    kind = "choice"
    family = "pmc_vqa"
    description = "PMC-VQA-compatible: the letter with the highest difflib ratio to the raw generation"

    def score(self, prediction: str, item: VQAItem) -> float:
        letters = tuple(k for k, _ in item.choices or ())
        return float(medvint_letter(prediction, letters) == medvint_letter(item.answer_label or "", letters))


COMPAT_METRICS: tuple[type[Metric], ...] = (
    LlavaMedClosed,
    LlavaMedOpenSubstring,
    LlavaMedOpenRecall,
    PmcVqaChoice,
)
