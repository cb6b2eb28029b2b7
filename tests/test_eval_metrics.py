"""Evaluation metrics on hand-made cases: strict normalisation (whole words, numbers, option letters), the
LLaVA-Med and PMC-VQA compatibility scorers, breakdowns and bootstrap intervals."""

from __future__ import annotations

import math

import pytest

from cambrian_core.eval.compat import llava_med_recall, medvint_letter
from cambrian_core.eval.items import VQAItem
from cambrian_core.eval.metrics import closed_correct, token_f1
from cambrian_core.eval.normalize import (
    alternatives,
    gold_polarity,
    llava_med_normalize,
    normalize_answer,
    option_letter,
    polarity,
    tokens,
)
from cambrian_core.eval.scoring import bootstrap_ci, build_metrics, score_items
from cambrian_core.registry import METRICS, build

CHOICES = (("A", "MRI"), ("B", "CT scan"), ("C", "Ultrasound"), ("D", "PET"))


def item(
    answer: str, kind: str = "open", question: str = "q?", qtype: str | None = None, qid: str = "1"
) -> VQAItem:
    if kind == "choice":
        label = next(k for k, v in CHOICES if v == answer)
        return VQAItem(qid, (), question, answer, "closed", qtype, CHOICES, label)
    return VQAItem(qid, (), question, answer, kind, qtype)


def score(name: str, prediction: str, it: VQAItem) -> float:
    return build(METRICS, {"type": name}).score(prediction, it)


# ------------------------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two", ["2"]),
        ("2.0", ["2"]),
        ("2.50 cm", ["2.5", "cm"]),
        ("007", ["7"]),
        ("1,000 cells", ["1000", "cells"]),
        ("1,2", ["1", "2"]),
        ("The LEFT-sided lesion.", ["left", "sided", "lesion"]),
        ("Don't", ["dont"]),
        ("肝脏 MRI", ["肝", "脏", "mri"]),
        ("A mass in the liver. A cyst.", ["mass", "in", "liver", "cyst"]),  # articles opening sentences
        ("There is a mass", ["there", "is", "mass"]),
        ("Type A", ["type", "a"]),  # a letter, not an article: last word, capital mid-sentence, before "or"
        ("hepatitis a", ["hepatitis", "a"]),
        ("vitamin A deficiency", ["vitamin", "a", "deficiency"]),
        ("Is this a type a or type b?", ["is", "this", "type", "a", "or", "type", "b"]),
    ],
)
def test_strict_tokens(text: str, expected: list[str]) -> None:
    assert tokens(text) == expected


def test_numbers_compare_equal_in_every_spelling() -> None:
    assert normalize_answer("two") == normalize_answer("2") == normalize_answer("2.0") == "2"
    assert closed_correct("2.0", "two") and closed_correct("There are two.", "2")
    assert score("open_exact_match", "2.0", item("two")) == 1.0


def test_polarity_is_whole_word() -> None:
    assert polarity("Nodule in the left lung") is None
    assert polarity("Normal study") is None
    assert polarity("No, there is no effusion.") == "no"
    assert polarity("Yes.") == "yes"
    assert polarity("是的") == "yes"
    assert polarity("没有") == "no"
    assert gold_polarity("No") == "no" and gold_polarity("none") is None and gold_polarity("是") == "yes"


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("B", "B"),
        ("(a)", "A"),
        ("(A) MRI", "A"),
        ("b)", "B"),
        ("C.", "C"),
        ("D: PET", "D"),
        ("option B", "B"),
        ("Option b is right", "B"),
        ("The answer is C", "C"),
        ("answer: (d)", "D"),
        ("The answer is B, not option C.", "B"),  # an explicit answer outranks other letters
        ("Option A is wrong; the answer is B.", "B"),
        ("A: no. The answer is A, then. Final answer: B", "B"),  # the last explicit answer is the conclusion
        ("I would pick (B) here", "B"),
        ("Ultrasound", "C"),  # the text of exactly one option
        ("It is a CT scan of the chest", "B"),
        ("a", "A"),  # a bare letter is a letter
        ("a scan", None),  # ... but an article is not
        ("MRI or PET", None),  # two options' texts: ambiguous
        ("none of these", None),
        ("Option A is wrong; the answer is option B", "B"),
        ("The correct option is (c).", "C"),
        ("the best choice is D", "D"),
    ],
)
def test_option_letter(prediction: str, letter: str | None) -> None:
    assert option_letter(prediction, ("A", "B", "C", "D"), CHOICES) == letter


def test_a_choice_whose_text_starts_like_a_letter_is_read_as_that_choice() -> None:
    choices = (("A", "C. difficile colitis"), ("B", "Ischaemic colitis"), ("C", "Crohn disease"))
    assert option_letter("C. difficile colitis", ("A", "B", "C"), choices) == "A"
    assert option_letter("C. Crohn disease", ("A", "B", "C"), choices) == "C"


def test_letters_in_answers_keep_closed_and_open_scores_honest() -> None:
    assert not closed_correct("Type B", "Type A", "Is this a type A or type B aortic dissection?")
    assert closed_correct("type A", "Type A", "Is this a type A or type B aortic dissection?")
    assert score("open_exact_match", "Hepatitis", item("Hepatitis A")) == 0.0
    assert score("open_recall", "Hepatitis B", item("Hepatitis A")) == 0.5
    assert score("open_exact_match", "The hepatitis A", item("Hepatitis A")) == 1.0


def test_alternatives() -> None:
    assert alternatives("Is the lesion on the left or right?") == ("left", "right")
    assert alternatives("Is this a T1 or T2 weighted image?") == ("t1", "t2")
    assert alternatives("Is there a mass?") is None


# --------------------------------------------------------------------------------------------- closed set
@pytest.mark.parametrize(
    ("prediction", "answer", "question", "strict", "llava"),
    [
        ("Nodule in the left lung", "no", "Is the lung clear?", 0.0, 1.0),  # the substring trap
        ("Normal", "no", "Is there an abnormality?", 0.0, 1.0),
        ("not seen", "no", "Is there a fracture?", 0.0, 1.0),
        ("No, there is no effusion.", "No", "Is there pleural effusion?", 1.0, 1.0),
        ("yes", "No", "Is there a mass?", 0.0, 0.0),
        ("There is no evidence of yes", "yes", "Is there a mass?", 0.0, 1.0),
        ("left", "Left", "Is the lesion on the left or right?", 1.0, 1.0),
        ("The lesion is on the left side.", "left", "Is the lesion on the left or right?", 1.0, 1.0),
        ("left and right", "left", "Is the lesion on the left or right?", 0.0, 1.0),
        ("right", "left", "Is the lesion on the left or right?", 0.0, 0.0),
        ("This is a CT scan.", "CT", "Is this a CT or an MRI?", 1.0, 1.0),
        ("CTA", "CT", "What modality?", 0.0, 1.0),
        ("2", "two", "How many lesions?", 1.0, 1.0),
        ("2", "2.0", "How many lesions?", 1.0, 0.0),  # LLaVA-Med keeps "2.0" as written
    ],
)
def test_closed_strict_vs_llava_med(
    prediction: str, answer: str, question: str, strict: float, llava: float
) -> None:
    it = item(answer, "closed", question)
    assert score("closed_accuracy", prediction, it) == strict
    assert score("llava_med_closed", prediction, it) == llava


# ----------------------------------------------------------------------------------------------- open set
def test_open_metrics_exact_values() -> None:
    it = item("left lower lobe")
    pred = "lower lobe"
    assert score("open_recall", pred, it) == pytest.approx(2 / 3)
    assert score("open_exact_match", pred, it) == 0.0
    assert score("open_f1", pred, it) == pytest.approx(0.8)
    assert score("open_bleu1", pred, it) == pytest.approx(math.exp(1 - 3 / 2))
    assert score("open_exact_match", "The left lower lobe.", it) == 1.0
    # longer prediction: precision 2/4, no brevity penalty
    assert score("open_bleu1", "the lower lobe is bright today", it) == pytest.approx(2 / 5)
    assert token_f1("", "x") == 0.0 and token_f1("liver", "spleen") == 0.0


def test_llava_med_normaliser_and_recall() -> None:
    assert llava_med_normalize("Yes, there is a mass.") == "yes there is mass"
    assert llava_med_normalize("left-sided") == "left sided"
    assert llava_med_normalize("1,000 cells") == "1000 cells"
    assert llava_med_normalize("a/b") == "b"
    assert llava_med_normalize("is: yes") == "is: yes"
    assert llava_med_normalize("None") == "0"
    assert llava_med_normalize("dont") == "don't"
    # the whole VQA table: each apostrophe of a double contraction may be the missing one; capitalised keys
    # ("Im") never match lower-cased words; "somebody'd" loses its apostrophe, as upstream's table says
    assert llava_med_normalize("Hes sure itll heal, it couldnt've") == "he's sure it'll heal it couldn't've"
    assert llava_med_normalize("shouldn'tve twas yall'd've") == "shouldn't've 'twas y'all'd've"
    assert llava_med_normalize("Im somebody'd") == "im somebodyd"
    # tp counts prediction repeats, fn gold-only words: 3 / (3 + 1); the strict recall clips repeats: 2 / 3
    assert llava_med_recall("lower lobe lower", "left lower lobe") == pytest.approx(0.75)
    assert score("open_recall", "lower lobe lower", item("left lower lobe")) == pytest.approx(2 / 3)
    assert score("llava_med_open_recall", "", item("x")) == 0.0
    assert score("llava_med_open_substring", "a granuloma is seen", item("granuloma")) == 1.0


# -------------------------------------------------------------------------------------------- multi choice
def test_choice_strict_vs_pmc_vqa_compat() -> None:
    it = item("CT scan", "choice")
    assert score("choice_accuracy", "B", it) == 1.0
    assert score("choice_accuracy", "(b)", it) == 1.0
    assert score("choice_accuracy", "CT scan", it) == 1.0
    assert score("choice_accuracy", "A", it) == 0.0
    assert score("pmc_vqa_choice", "B", it) == 1.0
    # MedVInT-TE's difflib rule reads the "C" of "CT" as option C
    assert medvint_letter("CT scan") == "C"
    assert score("pmc_vqa_choice", "CT scan", it) == 0.0
    # ties keep the first letter: "B" and "C" both occur once
    assert medvint_letter("The answer is B: CT") == "B"
    # nothing like a letter (empty, a failed generation, lower case) picks none, so it is wrong even when the
    # gold letter is the first one (MedVInT-TE starts from a similarity of 0 and a letter of None)
    gold_a = item("MRI", "choice")
    for text in ("", "ultrasound", "pet scan"):
        assert medvint_letter(text) is None
        assert score("pmc_vqa_choice", text, gold_a) == 0.0
    # the letter is difflib's first sequence, the generation its second (junk heuristic at 200+ characters)
    long = "B: CT scan. " + "x" * 244
    assert len(long) == 256 and medvint_letter(long) == "B"


def test_metrics_apply_to_one_kind() -> None:
    kinds = {m.name: m.kind for m in build_metrics()}
    assert kinds["closed_accuracy"] == "closed" and kinds["open_f1"] == "open"
    assert kinds["choice_accuracy"] == "choice" and kinds["llava_med_closed"] == "closed"
    assert not build(METRICS, {"type": "closed_accuracy"}).applies(item("CT scan", "choice"))


@pytest.mark.parametrize("name", [m.name for m in build_metrics()])
def test_every_registered_metric_scores_the_gold_answer_one(name: str) -> None:
    metric = build(METRICS, {"type": name})
    cases = [item("no", "closed"), item("left lower lobe"), item("CT scan", "choice"), item("肝脏", "open")]
    applicable = [c for c in cases if metric.applies(c)]
    assert applicable, f"{name} applies to none of the probe items"
    for c in applicable:
        gold = c.answer_label if c.kind == "choice" and metric.family == "pmc_vqa" else c.answer
        assert metric.score(gold, c) == 1.0
        assert metric.score("", c) == 0.0
    info = metric.info()
    assert info["family"] and info["label"] and info["description"]


# ---------------------------------------------------------------------------------------------- aggregation
def test_score_items_breakdown_and_missing() -> None:
    items = [
        item("yes", "closed", qtype="PRES", qid="a"),
        item("no", "closed", qtype="PRES", qid="b"),
        item("CT", "closed", qtype="MODALITY", qid="c"),
        item("liver", "open", qtype="ORGAN", qid="d"),
    ]
    preds = {"a": "Yes.", "b": "nodule", "c": "CT", "d": "the liver"}
    out = score_items(
        items, preds, build_metrics(["closed_accuracy", "open_exact_match", "choice_accuracy"]), n_boot=200
    )
    closed = out["metrics"]["closed_accuracy"]
    assert closed["value"] == pytest.approx(2 / 3) and closed["n"] == 3
    assert closed["by"]["question_type"] == {
        "MODALITY": {"value": 1.0, "n": 1},
        "PRES": {"value": 0.5, "n": 2},
    }
    assert out["metrics"]["open_exact_match"]["value"] == 1.0
    assert "choice_accuracy" not in out["metrics"]  # no multiple-choice item
    assert out["per_item"]["b"] == {"closed_accuracy": 0.0}
    with pytest.raises(ValueError, match="1 of 4 items have no prediction"):
        score_items(items, {k: v for k, v in preds.items() if k != "d"}, n_boot=0)
    partial = score_items(
        items, {"a": "yes"}, build_metrics(["closed_accuracy"]), n_boot=0, allow_missing=True
    )
    assert partial["n_missing"] == 3 and partial["metrics"]["closed_accuracy"]["value"] == pytest.approx(
        1 / 3
    )


def test_bootstrap_is_seeded_and_brackets_the_mean() -> None:
    scores = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1] * 5
    a = bootstrap_ci(scores, n_boot=500, seed=3)
    assert a == bootstrap_ci(scores, n_boot=500, seed=3)
    assert a != bootstrap_ci(scores, n_boot=500, seed=4)
    assert a[0] < 0.7 < a[1] and a[0] > 0.5 and a[1] < 0.9
    assert bootstrap_ci([1.0] * 20, n_boot=100) == (1.0, 1.0)
    assert bootstrap_ci([0.25], n_boot=100) == (0.25, 0.25)
    with pytest.raises(ValueError, match="at least one score"):
        bootstrap_ci([])


def test_default_metrics_skip_other_kinds_of_registered_metrics() -> None:
    class NotAVQAMetric:  # what another plugin might register in METRICS
        def __init__(self, size: int = 2) -> None:
            self.size = size

    from cambrian_core import plugins

    plugins.ensure_loaded()
    METRICS.register_module(name="zz_other_metric", module=NotAVQAMetric)
    try:
        names = [m.name for m in build_metrics()]
        assert "zz_other_metric" not in names
        assert names[:2] == ["closed_accuracy", "open_recall"] and names[-1] == "pmc_vqa_choice"
    finally:
        METRICS._module_dict.pop("zz_other_metric")
        METRICS.providers.pop("zz_other_metric", None)


# ------------------------------------------------------------------------------------------ review fixes
@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("**B**", "B"),  # markdown emphasis
        ("`C`", "C"),
        ("[B]", "B"),
        ("[d]", "D"),
        ("B。", "B"),
        ("B\n\nExplanation: A is wrong", "B"),  # a letter alone on the first line
        ("I choose B", "B"),
        ("I would go with C because A is wrong", "C"),
        ("答案是B", "B"),
        ("I choose a scan", None),  # "a" stays the article
        ("a\nbecause of the signal", "A"),  # ... but alone on a line it is a letter
    ],
)
def test_option_letter_reads_markdown_brackets_first_line_and_choose(
    prediction: str, letter: str | None
) -> None:
    assert option_letter(prediction, ("A", "B", "C", "D"), CHOICES) == letter


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("图中没有肺结节。", "no"),  # the marker need not open the answer
        ("肺部无异常", "no"),
        ("未见明显异常", "no"),
        ("该图像中有积液", "yes"),
        ("图像显示存在病变，是的", "yes"),
        ("是，不存在", "yes"),  # the first marker decides
        ("病灶不存在", "no"),
        ("不规则", None),  # 不 starting "irregular" says nothing
        ("不", "no"),  # 不 standing alone is "no"
        ("不。", "no"),
        ("边缘不规则的肿块", None),
        ("无法确定", None),  # 无法 (cannot) and 还是 (or) hold markers but answer nothing
        ("还是左侧", None),
        ("左右对称", None),
    ],
)
def test_chinese_polarity_finds_the_first_marker_anywhere(prediction: str, expected: str | None) -> None:
    assert polarity(prediction) == expected


def test_chinese_closed_answers_are_scored_by_their_first_marker() -> None:
    assert closed_correct("图中没有肺结节。", "否") and closed_correct("该图像中有积液", "是")
    assert not closed_correct("不规则", "否") and not closed_correct("图中没有肺结节。", "是")
    assert closed_correct("不", "不")  # a gold answer of a bare 不 is matched by itself


def test_list_answers_match_in_any_order() -> None:
    it = item("Lung, Heart")
    assert score("open_exact_match", "Heart, Lung", it) == 1.0
    assert score("open_exact_match", "the heart and the lung", it) == 1.0
    assert score("open_exact_match", "Heart", it) == 0.0
    assert score("open_exact_match", "Heart, Lung, Liver", it) == 0.0
    assert closed_correct("Heart, Lung", "Lung, Heart", "Which organs are abnormal?")
    assert closed_correct("heart and lung", "lung and heart")
    assert not closed_correct("Heart", "Lung, Heart")
    assert score("open_exact_match", "1,000 cells", item("1,000 cells")) == 1.0  # not a list


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (".5 cm", ["0.5", "cm"]),
        ("-3", ["-3"]),
        ("+3", ["3"]),
        ("-0.0", ["0"]),
        ("\u22122", ["-2"]),  # the minus sign
        ("3-4 cm", ["3", "4", "cm"]),  # a range, not a negative number
        ("T2-weighted", ["t2", "weighted"]),
        ("5%", ["5", "%"]),
        ("50 %", ["50", "%"]),
    ],
)
def test_numbers_keep_sign_leading_dot_and_percent(text: str, expected: list[str]) -> None:
    assert tokens(text) == expected


def test_numbers_that_differ_do_not_match() -> None:
    assert score("open_exact_match", ".5 cm", item("5 cm")) == 0.0
    assert score("open_exact_match", ".5 cm", item("0.5 cm")) == 1.0
    assert score("open_exact_match", "3", item("-3")) == 0.0
    assert score("open_exact_match", "5", item("5%")) == 0.0
    assert score("open_exact_match", "5 %", item("5%")) == 1.0
