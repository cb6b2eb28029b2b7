"""Strict VQA metrics (registered in ``METRICS``): one score in ``[0, 1]`` per (prediction, item).

Each metric applies to one kind of item: ``closed`` (yes/no and other closed answers), ``open`` (free text) or
``choice`` (multiple choice). Scores are averaged, broken down and bootstrapped by :mod:`.scoring`.

* ``closed_accuracy``: a yes/no gold answer matches the first whole word yes/no of the prediction (``"no"`` inside
  ``"nodule"`` does not count); any other closed answer must appear as whole normalised words (a list answer,
  ``"Lung, Heart"`` or ``"lung and heart"``: each of its items, in any order), and for an ``"X or Y"`` question a
  prediction naming the other alternative too is wrong.
* ``open_recall`` (share of gold tokens found, clipped counts), ``open_exact_match`` (a list answer matches its
  items in any order), ``open_f1`` (token F1), ``open_bleu1`` (clipped unigram precision with brevity penalty), all
  on strict normalised tokens.
* ``choice_accuracy``: the option letter parsed from the prediction (``"B"``, ``"(b)"``, ``"option B"``, or the
  text of exactly one option) equals the gold letter.

The LLaVA-Med and PMC-VQA compatible scorers live in :mod:`.compat`, labelled as such.
"""

from __future__ import annotations

import abc
import math
from collections import Counter
from typing import Any, ClassVar

from cambrian_core.eval.items import VQAItem
from cambrian_core.eval.normalize import (
    alternatives,
    contains_phrase,
    gold_polarity,
    list_items,
    option_letter,
    polarity,
    same_items,
    tokens,
)

__all__ = [
    "BLEU1",
    "ChoiceAccuracy",
    "ClosedAccuracy",
    "Metric",
    "OpenExactMatch",
    "OpenF1",
    "OpenRecall",
    "closed_correct",
    "register",
    "token_f1",
]


class Metric(abc.ABC):
    """A per-item score. Subclasses set the class attributes and implement :meth:`score`."""

    #: registered name
    name: ClassVar[str]
    #: column label in tables and plots
    label: ClassVar[str]
    #: item kind it applies to: ``closed``, ``open`` or ``choice``
    kind: ClassVar[str]
    #: ``strict`` (ours) or the name of the published protocol it reproduces (``llava_med``, ``pmc_vqa``)
    family: ClassVar[str] = "strict"
    #: one line for the results file
    description: ClassVar[str] = ""

    def applies(self, item: VQAItem) -> bool:
        return item.kind == self.kind

    @abc.abstractmethod
    def score(self, prediction: str, item: VQAItem) -> float:
        """Score of one prediction for ``item`` (0..1)."""

    def info(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "kind": self.kind,
            "family": self.family,
            "description": self.description,
        }


def closed_correct(prediction: str, answer: str, question: str = "") -> bool:
    """The strict closed-set rule (see the module docstring)."""
    gold = gold_polarity(answer)
    if gold is not None:
        return polarity(prediction) == gold
    gt, pt = tokens(answer), tokens(prediction)
    if not gt:
        return False
    if not contains_phrase(pt, gt):
        items = list_items(answer)  # "Heart, Lung" answers "Lung, Heart"
        if items is None or not all(contains_phrase(pt, item) for item in items):
            return False
    if pt == gt:
        return True
    alt = alternatives(question)
    if alt is not None:
        a, b = alt
        other = b if (a in gt and b not in gt) else a if (b in gt and a not in gt) else None
        if other is not None and other in pt:
            return False
    return True


def _overlap(pred: list[str], gold: list[str]) -> int:
    return sum((Counter(pred) & Counter(gold)).values())


def token_f1(prediction: str, answer: str) -> float:
    """Token F1 on strict normalised tokens (0 when either side is empty)."""
    p, g = tokens(prediction), tokens(answer)
    common = _overlap(p, g)
    if not p or not g or common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


class ClosedAccuracy(Metric):
    name = "closed_accuracy"
    label = "closed accuracy (strict)"
    kind = "closed"
    description = (
        "whole-word yes/no; other closed answers as whole normalised words; 'X or Y' naming both is wrong"
    )

    def score(self, prediction: str, item: VQAItem) -> float:
        return float(closed_correct(prediction, item.answer, item.question))


class OpenRecall(Metric):
    name = "open_recall"
    label = "open token recall (strict)"
    kind = "open"
    description = "share of normalised gold tokens present in the prediction (clipped counts)"

    def score(self, prediction: str, item: VQAItem) -> float:
        g = tokens(item.answer)
        return _overlap(tokens(prediction), g) / len(g) if g else 0.0


class OpenExactMatch(Metric):
    name = "open_exact_match"
    label = "open exact match (strict)"
    kind = "open"
    description = "normalised prediction equals the normalised gold answer (a list's items in any order)"

    def score(self, prediction: str, item: VQAItem) -> float:
        g = tokens(item.answer)
        return float(bool(g) and (tokens(prediction) == g or same_items(prediction, item.answer)))


class OpenF1(Metric):
    name = "open_f1"
    label = "open token F1 (strict)"
    kind = "open"
    description = "token F1 of the normalised prediction against the normalised gold answer"

    def score(self, prediction: str, item: VQAItem) -> float:
        return token_f1(prediction, item.answer)


class BLEU1(Metric):
    name = "open_bleu1"
    label = "open BLEU-1 (strict)"
    kind = "open"
    description = "sentence BLEU-1: clipped unigram precision times the brevity penalty, normalised tokens"

    def score(self, prediction: str, item: VQAItem) -> float:
        p, g = tokens(prediction), tokens(item.answer)
        if not p or not g:
            return 0.0
        precision = _overlap(p, g) / len(p)
        brevity = 1.0 if len(p) > len(g) else math.exp(1 - len(g) / len(p))
        return brevity * precision


class ChoiceAccuracy(Metric):
    name = "choice_accuracy"
    label = "choice accuracy (strict)"
    kind = "choice"
    description = (
        "option letter parsed from the prediction (letter forms or one option's text) equals the gold"
    )

    def score(self, prediction: str, item: VQAItem) -> float:
        choices = item.choices or ()
        letter = option_letter(prediction, [k for k, _ in choices], choices)
        return float(letter == item.answer_label)


STRICT_METRICS: tuple[type[Metric], ...] = (
    ClosedAccuracy,
    OpenRecall,
    OpenExactMatch,
    OpenF1,
    BLEU1,
    ChoiceAccuracy,
)


def register(registries: Any) -> None:
    """Core plugin hook: the strict metrics and the compatibility scorers go into ``METRICS``."""
    from cambrian_core.eval.compat import COMPAT_METRICS

    for cls in (*STRICT_METRICS, *COMPAT_METRICS):
        registries.metrics.register_module(name=cls.name, module=cls)
