"""Structured model output: the JSON schema a prompt asks for, and strict validation of what came back.

Three shapes, named by a prompt's ``# output:`` header:

* ``qa``: ``{"qa": [{"question": str, "answer": str}, ...]}``
* ``caption``: ``{"caption": str}``
* ``caption_qa``: both keys.

:func:`parse_output` raises :class:`OutputError` with a message precise enough to send back to the model, so the
generator can re-ask it to fix exactly that.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["OutputError", "looks_like_refusal", "output_schema", "parse_output", "schema_instructions"]

_REFUSAL_RE = re.compile(
    r"\b(i'?m sorry|i am sorry|i can(?:no|')t (?:help|assist|provide|analy[sz]e|interpret|view)|"
    r"as an ai\b|unable to (?:analy[sz]e|view|interpret|provide))",
    re.IGNORECASE,
)
_FENCE_RE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


class OutputError(ValueError):
    """The model's answer is not the JSON the prompt asked for; the message says what is wrong."""


def output_schema(kind: str, min_pairs: int = 1, max_pairs: int = 8, bounds: bool = True) -> dict[str, Any]:
    """JSON schema for ``kind``. ``bounds=False`` leaves out ``minItems``/``maxItems``, which strict structured
    output modes reject; :func:`parse_output` checks the pair count either way."""
    qa: dict[str, Any] = {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
            "required": ["question", "answer"],
            "additionalProperties": False,
        },
    }
    if bounds:
        qa.update(minItems=min_pairs, maxItems=max_pairs)
    props: dict[str, Any] = {}
    if kind in ("caption", "caption_qa"):
        props["caption"] = {"type": "string"}
    if kind in ("qa", "caption_qa"):
        props["qa"] = qa
    if not props:
        raise ValueError(f"unknown output kind {kind!r}; expected qa, caption or caption_qa")
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def schema_instructions(kind: str, min_pairs: int, max_pairs: int) -> str:
    """One paragraph telling the model the exact JSON to return (for servers without schema enforcement)."""
    parts = []
    if kind in ("caption", "caption_qa"):
        parts.append('"caption": a string')
    if kind in ("qa", "caption_qa"):
        n = str(min_pairs) if min_pairs == max_pairs else f"{min_pairs} to {max_pairs}"
        parts.append(f'"qa": a list of {n} objects, each {{"question": string, "answer": string}}')
    return (
        "Reply with one JSON object and nothing else (no markdown, no commentary). Its keys: "
        + "; ".join(parts)
        + ". Every string must be non-empty."
    )


def looks_like_refusal(text: str) -> bool:
    """True when ``text`` reads like a model refusing the task (MultiViewDx filtered these by 'sorry')."""
    return bool(_REFUSAL_RE.search(text))


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise OutputError(f"{where} must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise OutputError(f"{where} is empty")
    if looks_like_refusal(value):
        raise OutputError(f"{where} is a refusal ({value[:80]!r}); answer the task as asked")
    return value


def parse_output(content: str | None, kind: str, min_pairs: int = 1, max_pairs: int = 8) -> dict[str, Any]:
    """Parse and validate ``content``; returns ``{"caption": str}`` and/or ``{"qa": [(q, a), ...]}``."""
    if content is None or not content.strip():
        raise OutputError("the reply is empty; return the JSON object")
    fenced = _FENCE_RE.match(content)
    raw = fenced.group(1) if fenced else content.strip()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise OutputError(
            f"the reply is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if kind == "qa" and isinstance(data, list):
        data = {"qa": data}
    if not isinstance(data, dict):
        raise OutputError(f"the reply must be a JSON object, got a {type(data).__name__}")
    wanted = set(output_schema(kind)["properties"])
    missing = sorted(wanted - set(data))
    if missing:
        raise OutputError(f"the JSON object lacks the key(s) {missing}; it has {sorted(data)}")
    out: dict[str, Any] = {}
    if "caption" in wanted:
        out["caption"] = _text(data["caption"], "`caption`")
    if "qa" in wanted:
        items = data["qa"]
        if not isinstance(items, list):
            raise OutputError(f"`qa` must be a list, got {type(items).__name__}")
        if not min_pairs <= len(items) <= max_pairs:
            raise OutputError(f"`qa` must hold {min_pairs} to {max_pairs} pairs, got {len(items)}")
        pairs = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise OutputError(f"`qa[{i}]` must be an object with `question` and `answer`")
            lacking = [k for k in ("question", "answer") if k not in item]
            if lacking:
                raise OutputError(f"`qa[{i}]` lacks {lacking}")
            pairs.append(
                (_text(item["question"], f"`qa[{i}].question`"), _text(item["answer"], f"`qa[{i}].answer`"))
            )
        out["qa"] = pairs
    return out
