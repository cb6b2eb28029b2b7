"""LLM-as-judge: each answer graded 0-5 on key points, reasoning and evidence against the reference answer.

The rubric is the seed recipe's (reference §F / §A.10, in our words; ``prompts/judge.v<N>.txt``): the judge first
lists the reference's key points, reasoning steps and evidence, then scores the answer on the three axes. Calls go
through :class:`~cambrian_core.data.generators.chat_client.ChatClient` (any OpenAI-compatible endpoint, with a
concurrency limit, retries and backoff). Grades are appended to ``judge.<model>.<prompt>.jsonl`` and resumed like
predictions; the results record the judge model (as requested and as the server reported it) and the prompt tag.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cambrian_core.data.generators.chat_client import ChatAPIError, ChatClient, resolve_setting
from cambrian_core.eval.items import VQAItem
from cambrian_core.eval.prompts import load_judge_prompt
from cambrian_core.eval.runner import repair_tail
from cambrian_core.eval.scoring import bootstrap_ci

__all__ = ["AXES", "Judge", "JudgeError", "JudgeReplyError", "judge_inputs", "parse_grade"]

log = logging.getLogger(__name__)

AXES = ("key_points", "reasoning", "evidence")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL | re.IGNORECASE)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge endpoint cannot be used (bad URL, key, model...)."""


class JudgeReplyError(ValueError):
    """A judge reply is not the JSON the rubric asks for; the message says what is wrong."""


def _scores_object(text: str) -> dict[str, Any] | None:
    """The first balanced ``{...}`` in ``text`` that parses as a JSON object holding ``"scores"``."""
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            data, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(data, dict) and "scores" in data:
            return data
    return None


def parse_grade(content: str | None) -> dict[str, Any]:
    """Validate a judge reply; returns ``{"scores": {axis: float}, "key_points": [...], "reasoning_steps": [...],
    "evidence": [...]}``.

    ``<think>...</think>`` blocks are dropped; the reply is then the JSON itself, its first fenced block, or failing
    those the first balanced ``{...}`` holding ``"scores"`` (prose or a note around the JSON is ignored).
    """
    text = _THINK.sub("", content or "").strip()
    if not text:
        raise JudgeReplyError("the reply is empty")
    fenced = _FENCE.search(text)
    try:
        data = json.loads(fenced.group(1) if fenced else text)
    except ValueError as exc:
        data = _scores_object(text)
        if data is None:
            raise JudgeReplyError(f"the reply is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise JudgeReplyError(f"the reply must be a JSON object, got {type(data).__name__}")
    scores = data.get("scores")
    if not isinstance(scores, dict):
        raise JudgeReplyError('the reply lacks the "scores" object')
    out: dict[str, float] = {}
    for axis in AXES:
        value = scores.get(axis)
        if isinstance(value, bool):  # float(True) would be 1.0
            raise JudgeReplyError(f"scores.{axis} must be a number from 0 to 5, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise JudgeReplyError(f"scores.{axis} must be a number from 0 to 5, got {value!r}") from None
        if not 0.0 <= number <= 5.0 or number != number:
            raise JudgeReplyError(f"scores.{axis} must be between 0 and 5, got {number}")
        out[axis] = number
    lists = {
        k: [str(x) for x in data.get(k) or [] if str(x).strip()]
        for k in ("key_points", "reasoning_steps", "evidence")
    }
    return {"scores": out, **lists}


def judge_inputs(item: VQAItem) -> tuple[str, str]:
    """The question and reference the judge sees. A multiple-choice item's question lists its lettered options
    and its reference is ``"B: CT scan"``, so that an answer given as a letter can be graded."""
    if not item.choices:
        return item.question, item.answer
    options = "\n".join(f"{k}: {v}" for k, v in item.choices)
    reference = f"{item.answer_label}: {item.answer}" if item.answer_label else item.answer
    return f"{item.question.strip()}\nOptions:\n{options}", reference


def _graded(item: VQAItem, answer: str) -> str:
    """What a grade's digest covers: the answer, plus the options and reference of a multiple-choice item (so
    grades made without the options are not reused)."""
    if not item.choices:
        return answer
    return "\n".join((*judge_inputs(item), answer))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "judge"


class Judge:
    """Grades answers through an OpenAI-compatible chat endpoint.

    Args:
        model: judge model name sent to the server.
        base_url / api_key: default to ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` (then the OpenAI API).
        prompt_version: judge prompt version (default: newest).
        max_tokens / temperature: sampling settings of each call (greedy by default).
        max_reasks: how often an invalid reply is sent back with its problem before the item is recorded failed.
        response_format: ``"json_object"`` (ask the server for JSON mode) or ``"none"``.
        timeout / max_retries / backoff / max_concurrency / seed: transport, see ``ChatClient``.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        prompt_version: str | None = None,
        max_tokens: int = 1024,
        temperature: float = 0.0,
        max_reasks: int = 1,
        response_format: str = "json_object",
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_concurrency: int = 4,
        seed: int | None = None,
    ) -> None:
        if response_format not in ("json_object", "none"):
            raise ValueError(f"response_format must be 'json_object' or 'none', got {response_format!r}")
        self.model = model
        self.base_url = resolve_setting(base_url, "OPENAI_BASE_URL", "https://api.openai.com/v1")
        self.prompt = load_judge_prompt(prompt_version)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.max_reasks = max_reasks
        self.response_format = response_format
        self.max_concurrency = max_concurrency
        self.client = ChatClient(
            self.base_url,
            resolve_setting(api_key, "OPENAI_API_KEY"),
            model,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_concurrency=max_concurrency,
            seed=seed,
        )
        self.reported_models: set[str] = set()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.client.close()

    def file_name(self) -> str:
        """Grades file of this judge model and prompt version."""
        return f"judge.{_slug(self.model)}.{self.prompt.tag}.jsonl"

    def grade(self, question: str, reference: str, answer: str) -> dict[str, Any]:
        """One grade (see :func:`parse_grade`, plus ``overall``, ``model`` and ``attempts``)."""
        messages: list[dict[str, Any]] = []
        if self.prompt.system:
            messages.append({"role": "system", "content": self.prompt.system})
        messages.append({"role": "user", "content": self.prompt.render(question, reference, answer)})
        params: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.response_format == "json_object":
            params["response_format"] = {"type": "json_object"}
        problem = ""
        for attempt in range(1, self.max_reasks + 2):
            result = self.client.chat(messages, **params)
            with self._lock:
                self.reported_models.add(result.model)
            try:
                grade = parse_grade(result.content)
            except JudgeReplyError as exc:
                problem = str(exc)
                messages += [
                    {"role": "assistant", "content": result.content or ""},
                    {
                        "role": "user",
                        "content": f"That reply cannot be used: {problem}. Reply with the JSON object only.",
                    },
                ]
                continue
            grade["overall"] = float(np.mean([grade["scores"][a] for a in AXES]))
            grade["model"] = result.model
            grade["attempts"] = attempt
            return grade
        raise JudgeReplyError(
            f"no valid grade after {self.max_reasks + 1} attempt(s); last problem: {problem}"
        )

    def grade_all(
        self,
        items: Sequence[VQAItem],
        predictions: Mapping[str, str],
        out_dir: str | Path,
        kinds: Sequence[str] = ("open",),
    ) -> dict[str, dict[str, Any]]:
        """Grade every item of ``kinds`` not yet graded in ``out_dir``; returns ``{qid: grade record}``.

        The first new item is graded alone: an unusable endpoint (wrong URL, key or model) raises
        :class:`JudgeError` before anything else is sent. Each grade records a digest of the answer it graded;
        a stored grade of another answer (the item was regenerated since, e.g. after a failed generation) is
        graded again.
        """
        path = Path(out_dir) / self.file_name()
        done = _read_grades(path)
        wanted = [it for it in items if it.kind in kinds]
        todo = [
            it
            for it in wanted
            if not _grades_answer(done.get(it.qid), _graded(it, predictions.get(it.qid, "")))
        ]
        for it in todo:
            done.pop(it.qid, None)
        if todo:
            repair_tail(path)
            self._grade_new(todo, predictions, path, done)
        return {it.qid: done[it.qid] for it in wanted if it.qid in done}

    def _grade_new(
        self,
        todo: Sequence[VQAItem],
        predictions: Mapping[str, str],
        path: Path,
        done: dict[str, dict[str, Any]],
    ) -> None:
        lock = threading.Lock()
        with open(path, "a", encoding="utf-8") as f:

            def run(item: VQAItem) -> None:
                try:
                    answer = predictions.get(item.qid, "")
                    rec = {
                        "qid": item.qid,
                        **self.grade(*judge_inputs(item), answer),
                        "answer_sha1": _digest(_graded(item, answer)),
                    }
                except (ChatAPIError, JudgeReplyError) as exc:
                    rec = {"qid": item.qid, "error": str(exc)}
                with lock:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    if "error" not in rec:
                        done[item.qid] = rec

            first = todo[0]
            answer = predictions.get(first.qid, "")
            try:
                grade = self.grade(*judge_inputs(first), answer)
            except ChatAPIError as exc:
                raise JudgeError(f"judge {self.model} at {self.base_url} is unusable: {exc}") from exc
            except JudgeReplyError as exc:
                grade = {"error": str(exc)}
            rec = {"qid": first.qid, **grade, "answer_sha1": _digest(_graded(first, answer))}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if "error" not in rec:
                done[first.qid] = rec
            with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
                list(pool.map(run, todo[1:]))

    def summary(
        self, grades: Mapping[str, Mapping[str, Any]], n_expected: int, n_boot: int = 1000, seed: int = 0
    ) -> dict[str, Any]:
        """Means and bootstrap intervals per axis and overall, with the judge's identity."""
        rows = list(grades.values())
        out: dict[str, Any] = {
            "model": self.model,
            "reported_models": sorted(
                self.reported_models | {str(r.get("model")) for r in rows if r.get("model")}
            ),
            "base_url": self.base_url,
            "prompt": self.prompt.tag,
            "scale": [0, 5],
            "n": len(rows),
            "n_failed": n_expected - len(rows),
            "usage": self.client.usage.as_dict(),
            "axes": {},
        }
        if not rows:
            return out
        for axis in (*AXES, "overall"):
            values = [float(r["overall"] if axis == "overall" else r["scores"][axis]) for r in rows]
            lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
            out["axes"][axis] = {"value": float(np.mean(values)), "ci": [lo, hi], "n": len(values)}
        return out


def _digest(answer: str) -> str:
    return hashlib.sha1(answer.encode("utf-8")).hexdigest()[:16]


def _grades_answer(rec: Mapping[str, Any] | None, answer: str) -> bool:
    """Whether a stored grade is of ``answer`` (grades written before digests were recorded count as such)."""
    return rec is not None and rec.get("answer_sha1", _digest(answer)) == _digest(answer)


def _read_grades(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "qid" in rec and "error" not in rec:
                out[str(rec["qid"])] = rec
    return out
