"""Answer normalisation for strict scoring, and LLaVA-Med's normaliser for its compatibility scorer.

Strict (:func:`tokens`): Unicode NFKC, lower case, apostrophes dropped, thousands separators removed, words split
on anything that is not a letter or digit, each CJK character its own token, number words up to twenty as digits,
numbers canonical with their sign (``"2.0"`` -> ``"2"``, ``"007"`` -> ``"7"``, ``"2.50"`` -> ``"2.5"``, ``".5"`` ->
``"0.5"``, ``"-3"`` -> ``"-3"``, ``"+3"`` -> ``"3"``; the ``-`` of a range such as ``"3-4"`` is no sign), ``%`` its own
token, articles dropped (a lone ``a`` that is a letter, as in "Type A" or "hepatitis a", is kept). Matching
is then done on whole tokens, never substrings: ``"no"`` is not found in ``"nodule"``.

LLaVA-Med (:func:`llava_med_normalize`): its VQA-style punctuation and article rules, reimplemented from the
behaviour documented in ``vqa_formats.md`` §6 so its published numbers can be compared against.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

__all__ = [
    "alternatives",
    "contains_phrase",
    "gold_polarity",
    "list_items",
    "llava_med_normalize",
    "normalize_answer",
    "option_letter",
    "polarity",
    "same_items",
    "tokens",
]

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
#: a number: an optional sign (not after a letter, digit or dot: "3-4" is a range) and digits or a leading-dot decimal
_NUM = r"(?:(?<![\w.])[-+\u2212])?(?:\d+(?:\.\d+)?|(?<![\w.])\.\d+)"
_TOKEN = re.compile(rf"{_NUM}|%|[{_CJK}]|[^\W_{_CJK}]+")
_NUMBER = re.compile(_NUM)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_APOSTROPHES = re.compile(r"['\u2019\u2018`]")
_WORD_NUMBERS = {
    w: str(i)
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
}
_ARTICLES = frozenset({"a", "an", "the"})
#: Chinese no / yes markers (a bare 不 is no marker: 不规则 is "irregular"); 对 counts only opening the answer
_ZH_NO = ("不是", "不存在", "不对", "不有", "不含", "没有", "没", "无", "否", "未见")
_ZH_YES = ("是", "有", "存在")
#: words holding a marker that answer nothing: whether, or, but, all, cannot, symmetric
_ZH_NEITHER = ("是否", "有无", "有没有", "还是", "但是", "可是", "于是", "所有", "无法", "对称")


def _number(tok: str) -> str:
    sign = "-" if tok[0] in "-\u2212" else ""
    whole, _, frac = tok.lstrip("+-\u2212").partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    out = f"{whole}.{frac}" if frac else whole
    return sign + out if out != "0" else out


def tokens(text: object, drop_articles: bool = True) -> list[str]:
    """Strict normalised tokens of ``text`` (see the module docstring)."""
    s = unicodedata.normalize("NFKC", str(text))
    s = _THOUSANDS.sub("", _APOSTROPHES.sub("", s))
    found = list(_TOKEN.finditer(s))
    out = []
    for i, match in enumerate(found):
        tok = match.group(0).lower()
        tok = _WORD_NUMBERS.get(tok, tok)
        if _NUMBER.fullmatch(tok):
            tok = _number(tok)
        if drop_articles and tok in _ARTICLES and _is_article(s, found, i):
            continue
        out.append(tok)
    return out


#: words after which a lone "a" is a letter, not an article ("type a or type b")
_AFTER_LETTER = frozenset({"or", "and", "vs", "versus", "nor"})


def _is_article(text: str, found: list[re.Match[str]], i: int) -> bool:
    """Whether token ``i`` (``a`` / ``an`` / ``the``) is an article. ``a`` is a letter ("Type A", "hepatitis a",
    "vitamin A deficiency") when it ends the text, precedes ``or`` / ``and``, or is a capital inside a sentence."""
    match = found[i]
    if match.group(0).lower() != "a":
        return True
    if i + 1 == len(found) or found[i + 1].group(0).lower() in _AFTER_LETTER:
        return False
    if match.group(0) == "A":
        before = text[: match.start()].rstrip()
        return not before or before[-1] in ".!?:;(\n"  # a capital A opening a sentence is the article
    return True


def normalize_answer(text: object) -> str:
    """The strict normal form as one string (tokens joined by single spaces)."""
    return " ".join(tokens(text))


def contains_phrase(haystack: Sequence[str], phrase: Sequence[str]) -> bool:
    """Whether ``phrase`` occurs in ``haystack`` as consecutive whole tokens."""
    n = len(phrase)
    if n == 0:
        return False
    return any(list(haystack[i : i + n]) == list(phrase) for i in range(len(haystack) - n + 1))


def polarity(text: object) -> str | None:
    """``"yes"`` / ``"no"`` from an answer: the first whole word yes or no (English), else the first Chinese marker
    (是/有/存在, or 对 opening the answer, versus 否/不是/不存在/没有/无/未见 or 不 standing alone; 不 inside a word
    as in 不规则 is none, nor
    are 是否, 还是, 无法...); ``None`` when the answer says neither."""
    for t in tokens(text):
        if t in ("yes", "no"):
            return t
    s = unicodedata.normalize("NFKC", str(text)).strip()
    if s.startswith("对") and not s.startswith("对称"):
        return "yes"
    if re.match(r"不(?:[\s,.!?;:，。！？；：、]|$)", s):  # a bare 不 standing alone: "no"
        return "no"
    i = 0
    while i < len(s):
        skip = next((w for w in _ZH_NEITHER if s.startswith(w, i)), None)
        if skip is not None:
            i += len(skip)
            continue
        if s.startswith(_ZH_NO, i):
            return "no"
        if s.startswith(_ZH_YES, i):
            return "yes"
        i += 1
    return None


_LIST_SEP = re.compile(r"\s*(?:[,;、，；]|\band\b)\s*", re.IGNORECASE)


def list_items(text: object) -> list[tuple[str, ...]] | None:
    """The items of a list answer (``"Lung, Heart"``, ``"lung and heart"``) as strict token tuples, in order;
    ``None`` unless it names at least two (thousands separators do not split: ``"1,000 cells"`` is one)."""
    s = _THOUSANDS.sub("", unicodedata.normalize("NFKC", str(text)))
    items = [tuple(t) for part in _LIST_SEP.split(s) if (t := tokens(part))]
    return items if len(items) >= 2 else None


def same_items(prediction: object, answer: object) -> bool:
    """Whether ``answer`` is a list and ``prediction`` lists the same items, in any order."""
    gold = list_items(answer)
    pred = list_items(prediction)
    return gold is not None and pred is not None and sorted(gold) == sorted(pred)


def gold_polarity(answer: object) -> str | None:
    """``"yes"`` / ``"no"`` when a gold answer is exactly a yes/no answer, else ``None``."""
    toks = tokens(answer)
    if toks in (["yes"], ["no"]):
        return toks[0]
    joined = "".join(toks)
    if joined in ("否", "不是", "没有", "无", "不", "不存在"):
        return "no"
    if joined in ("是", "有", "是的", "对", "存在"):
        return "yes"
    return None


def alternatives(question: object) -> tuple[str, str] | None:
    """The single words on each side of the last ``or`` of a question (``"Is it CT or MRI?"`` -> ``("ct",
    "mri")``), or ``None``."""
    toks = tokens(question)
    idx = max((i for i, t in enumerate(toks) if t == "or"), default=-1)
    if idx <= 0 or idx + 1 >= len(toks):
        return None
    return toks[idx - 1], toks[idx + 1]


def option_letter(
    text: object,
    letters: Sequence[str] = ("A", "B", "C", "D"),
    choices: Sequence[tuple[str, str]] | None = None,
) -> str | None:
    """The option a multiple-choice answer picks, or ``None`` when it picks none or is ambiguous.

    Markdown emphasis and backticks are ignored, ``[B]`` reads as ``(B)`` and ``。`` as ``.``. Recognised, in this
    order: a bare letter (``"B"``, ``"(b)"``, ``"B."``); the whole text of exactly one choice; ``"the answer is
    (option) B"`` / ``"the correct option is B"`` / ``"答案是B"`` (the last one); a letter alone on the first line
    (``"B\\n\\nExplanation: ..."``); a leading ``"B: ..."`` / ``"B) ..."`` / ``"(b) ..."``; ``"I choose B"`` / ``"I
    pick B"`` (capital letters only); ``"option B"`` / ``"choice b"``; a single ``"(B)"`` anywhere; and, failing
    those, one choice's words appearing in the answer. A lower-case ``a`` counts only where it cannot be the article.
    """
    raw = unicodedata.normalize("NFKC", str(text))
    raw = re.sub(r"[*_`]+", "", raw).replace("[", "(").replace("]", ")").replace("。", ".").strip()
    up = "".join(letters)
    lo = up.lower()
    if not up:
        return None
    bare = rf"^\(?\s*([{up}{lo}])\s*\)?\s*[.:)]?$"
    whole = re.search(bare, raw)  # the whole answer is a letter
    if whole:
        return whole.group(1).upper()
    pred = tokens(raw)
    if choices:  # the answer is exactly one choice's text ("C. difficile colitis" is not option C)
        exact = [k for k, v in choices if tokens(v) and tokens(v) == pred]
        if len(exact) == 1:
            return exact[0]
    # an explicit "answer is B" / "answer: (b)" / "the correct option is B" outranks letters mentioned before it
    # ("Option A is wrong; the answer is option B", "A: no. The answer is B"); the last one is the conclusion
    explicit = re.findall(
        rf"(?:(?i:\b(?:answer|(?:correct|right|best)\s+(?:option|choice))(?:\s+is)?)|答案\s*[是为]?)\s*[:\-]?\s*"
        rf"(?i:(?:option|choice)\s*)?(?:\(([{up}{lo}])\)|([{up}])(?!\w))",
        raw,
    )
    if explicit:
        return next(g for g in explicit[-1] if g).upper()
    first_line = re.search(bare, raw.splitlines()[0].strip()) if raw else None
    if first_line:  # "B\n\nExplanation: A is wrong"
        return first_line.group(1).upper()
    rules = [
        rf"^\(\s*([{up}{lo}])\s*\)",  # "(b) ..."
        rf"^([{up}])\s*[).:]",  # "B: ...", "B) ...", "B. ..."
        rf"^([{lo}])\)",  # "b) ..."
        # "I choose B", "I'd pick option C", "I select (b)"
        rf"(?i:\b(?:choose|chose|pick|picked|select|selected|go\s+with))\s+(?i:(?:option|choice)\s*)?"
        rf"(?:\(([{up}{lo}])\)|([{up}])(?!\w))",
        rf"(?i:\b(?:option|choice))\s*[:\-]?\s*\(?([{up}{lo}])(?![\w])",  # "option B", "choice (b)"
    ]
    for rule in rules:
        m = re.search(rule, raw)
        if m:
            return next(g for g in m.groups() if g).upper()
    bracketed = set(re.findall(rf"\(([{up}])\)", raw))
    if len(bracketed) == 1:
        return bracketed.pop()
    if choices:
        found = [k for k, v in choices if contains_phrase(pred, tokens(v))]
        if len(found) == 1:
            return found[0]
    return None


# ------------------------------------------------------------------------------------- LLaVA-Med compatibility
_LM_PUNCT = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_LM_DIGIT_COMMA = re.compile(r"\d,\d")
_LM_PERIOD = re.compile(r"\.(?!\d)")
_LM_NUMBERS = {"none": "0", **{w: n for w, n in _WORD_NUMBERS.items() if int(n) <= 10}}
#: the VQA evaluation's contraction table, as LLaVA-Med applies it (after lower-casing): each form below is
#: restored from its spelling without its apostrophe, and a form with several apostrophes from each spelling
#: that lacks one of them ("couldnt've", "couldn'tve" -> "couldn't've"). Its capitalised keys ("Im", "Ive",
#: "Id've", "I'dve") never match lower-cased words and are left out; "somebody'd" -> "somebodyd" is its own.
_LM_CONTRACTED_FORMS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't "
    "must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've "
    "who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've"
)
_LM_CONTRACTED = tuple(_LM_CONTRACTED_FORMS.split())


def _apostrophe_less(form: str) -> list[str]:
    cuts = [i for i, c in enumerate(form) if c == "'"]
    if len(cuts) == 1:
        return [form.replace("'", "")]
    return [form[:i] + form[i + 1 :] for i in cuts]


_LM_CONTRACTIONS = {key: form for form in _LM_CONTRACTED for key in _apostrophe_less(form)}
_LM_CONTRACTIONS["somebody'd"] = "somebodyd"


def llava_med_normalize(text: object) -> str:
    """LLaVA-Med's answer normaliser (lower case, VQA punctuation rules, periods, number words, articles).

    Punctuation from a fixed list is deleted when the text has that character next to a space (or has a
    digit-comma-digit anywhere), otherwise replaced by a space; colons, apostrophes and periods are not in the
    list. Periods not followed by a digit are then deleted (at most 32, as in the original). ``none`` and
    ``zero``...``ten`` become digits, ``a``/``an``/``the`` are dropped, common contractions get their apostrophe
    back, and commas are removed.
    """
    original = str(text).lower()
    out = original
    digit_comma = _LM_DIGIT_COMMA.search(original) is not None
    for p in _LM_PUNCT:
        if digit_comma or f"{p} " in original or f" {p}" in original:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _LM_PERIOD.sub("", out, count=32)
    words = []
    for w in out.split():
        w = _LM_NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_LM_CONTRACTIONS.get(w, w))
    return " ".join(words).replace(",", "")
