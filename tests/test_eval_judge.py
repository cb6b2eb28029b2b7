"""LLM-as-judge against a local HTTP server speaking chat completions: rubric prompt, JSON grades, re-asks,
retries, resume, an unusable endpoint, and the judge recorded in the results."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cambrian_core.eval.items import EvalSet, VQAItem
from cambrian_core.eval.judge import Judge, JudgeError, JudgeReplyError, parse_grade
from cambrian_core.eval.pipeline import evaluate
from cambrian_core.eval.prompts import load_judge_prompt
from cambrian_core.eval.runner import Answer, Request

GOOD = {"key_points": 5, "reasoning": 5, "evidence": 5}
POOR = {"key_points": 1, "reasoning": 2, "evidence": 0}


class JudgeServer:
    """Grades 5/5/5 when the candidate equals the reference, else 1/2/0. ``script`` holds one-off replies
    (``"garbage"``, ``503``, ``401``) served before grading."""

    def __init__(self, script: Sequence[Any] = ()) -> None:
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    step = server.script.pop(0) if server.script else None
                if isinstance(step, int):
                    return self._send(step, {"error": {"message": f"status {step}"}})
                prompt = next(m["content"] for m in body["messages"] if m["role"] == "user")
                ref = re.search(r"Reference answer:\n(.*?)\n\nCandidate answer:\n(.*?)\n\n", prompt, re.S)
                scores = GOOD if ref and ref[1].strip().lower() == ref[2].strip().lower() else POOR
                content = (
                    "not json at all"
                    if step == "garbage"
                    else json.dumps(
                        {"key_points": ["a point"], "reasoning_steps": [], "evidence": [], "scores": scores}
                    )
                )
                self._send(
                    200,
                    {
                        "model": "judge-x-0613",
                        "choices": [
                            {"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 20},
                    },
                )

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def judge_for(server: JudgeServer, **kw: Any) -> Judge:
    kw = {"timeout": 5.0, "max_retries": 2, "backoff": 0.01, "max_concurrency": 2, "seed": 0, **kw}
    return Judge("judge-x", base_url=server.url, api_key="k", **kw)


ITEMS = [
    VQAItem("o1", (), "Which organ is enlarged?", "spleen", "open", "ORGAN"),
    VQAItem("o2", (), "What is the lesion?", "granuloma", "open", "ABN"),
    VQAItem("o3", (), "Where is the mass?", "left lobe", "open", "POS"),
    VQAItem("c1", (), "Is there a fracture?", "no", "closed", "PRES"),
]
SAYS = {"o1": "spleen", "o2": "carcinoma", "o3": "Left lobe", "c1": "no"}


class Says:
    name = "fixed"

    def predict(self, requests: Sequence[Request]) -> list[Answer]:
        return [Answer(SAYS[r.item.qid]) for r in requests]


def test_parse_grade() -> None:
    good = {
        "key_points": [],
        "reasoning_steps": ["x"],
        "evidence": [],
        "scores": {"key_points": 4, "reasoning": "2.5", "evidence": 0},
    }
    assert parse_grade(json.dumps(good))["scores"] == {"key_points": 4.0, "reasoning": 2.5, "evidence": 0.0}
    assert parse_grade("```json\n" + json.dumps(good) + "\n```")["reasoning_steps"] == ["x"]
    with pytest.raises(JudgeReplyError, match="not valid JSON"):
        parse_grade("grade: 5")
    with pytest.raises(JudgeReplyError, match='lacks the "scores" object'):
        parse_grade('{"key_points": 5}')
    with pytest.raises(JudgeReplyError, match=r"scores.evidence must be between 0 and 5, got 6.0"):
        parse_grade(json.dumps({"scores": {"key_points": 1, "reasoning": 1, "evidence": 6}}))
    with pytest.raises(JudgeReplyError, match=r"scores.reasoning must be a number"):
        parse_grade(json.dumps({"scores": {"key_points": 1, "reasoning": "good", "evidence": 1}}))


def test_judge_prompt_is_versioned_and_filled() -> None:
    p = load_judge_prompt()
    assert p.tag == "judge.v1" and load_judge_prompt("1") == p
    text = p.render("Which organ?", "spleen", "")
    assert "Which organ?" in text and "spleen" in text and "(empty answer)" in text
    assert '"scores": {"key_points"' in text  # the JSON example keeps its braces
    with pytest.raises(ValueError, match="has no version 'v9'; versions: v1"):
        load_judge_prompt("v9")


def test_pipeline_with_judge_records_it_and_resumes(tmp_path: Path) -> None:
    es = EvalSet("private", "test", list(ITEMS))
    with JudgeServer() as server:
        judge = judge_for(server)
        out = evaluate(es, Says, tmp_path, model="m", judge=judge, n_boot=100)
        sent = list(server.requests)
        assert len(sent) == 3  # open items only
        body = sent[0]
        assert body["model"] == "judge-x" and body["temperature"] == 0.0
        assert body["response_format"] == {"type": "json_object"} and body["messages"][0]["role"] == "system"
        assert "Reference answer:\nspleen" in body["messages"][1]["content"]
        summary = out.judge
        assert summary["model"] == "judge-x" and summary["reported_models"] == ["judge-x-0613"]
        assert summary["prompt"] == "judge.v1" and summary["n"] == 3 and summary["n_failed"] == 0
        assert summary["axes"]["key_points"]["value"] == pytest.approx((5 + 1 + 5) / 3)
        assert summary["axes"]["evidence"]["value"] == pytest.approx(10 / 3)
        assert summary["axes"]["overall"]["value"] == pytest.approx((5 + 1 + 5) / 3)
        assert summary["usage"]["requests"] == 3 and summary["usage"]["prompt_tokens"] == 300
        results = json.loads((tmp_path / "results.json").read_text())
        assert results["judge"]["model"] == "judge-x" and results["judge"]["prompt"] == "judge.v1"
        assert (
            "## LLM judge: judge-x (reported: judge-x-0613), prompt `judge.v1`"
            in (tmp_path / "results.md").read_text()
        )
        errors = [json.loads(x) for x in (tmp_path / "errors.jsonl").read_text().splitlines()]
        assert [e["qid"] for e in errors] == ["o2"] and errors[0]["judge"]["overall"] == pytest.approx(1.0)
        assert (tmp_path / "judge.judge-x.judge.v1.jsonl").is_file()
        judge.close()
        again = judge_for(server)
        evaluate(es, Says, tmp_path, model="m", judge=again, n_boot=100)
        assert len(server.requests) == 3  # every grade was already on disk
        again.close()


def test_reask_on_invalid_reply_and_retry_on_503(tmp_path: Path) -> None:
    with JudgeServer(script=[503, "garbage"]) as server:
        judge = judge_for(server)
        grade = judge.grade("Which organ?", "spleen", "spleen")
        assert grade["attempts"] == 2 and grade["scores"] == {k: float(v) for k, v in GOOD.items()}
        assert judge.client.usage.retries == 1 and len(server.requests) == 3
        assert server.requests[2]["messages"][-1]["content"].startswith(
            "That reply cannot be used: the reply is not valid JSON"
        )
        judge.close()
    with JudgeServer(script=["garbage", "garbage"]) as server:
        judge = judge_for(server, max_reasks=1)
        with pytest.raises(JudgeReplyError, match=r"no valid grade after 2 attempt\(s\)"):
            judge.grade("q", "a", "b")
        judge.close()


def test_unusable_endpoint_stops_at_the_first_request(tmp_path: Path) -> None:
    with JudgeServer(script=[401]) as server:
        judge = judge_for(server)
        with pytest.raises(JudgeError, match=r"judge judge-x at .* is unusable: .*HTTP 401"):
            judge.grade_all(ITEMS, SAYS, tmp_path)
        assert len(server.requests) == 1
        judge.close()


def test_a_changed_answer_is_graded_again(tmp_path: Path) -> None:
    """A grade is of one answer: when the item's prediction changes (a failed generation regenerated on the
    next run), the stored grade is not reused."""
    with JudgeServer() as server:
        judge = judge_for(server)
        first = judge.grade_all(ITEMS, {"o1": "", "o2": "granuloma", "o3": "left lobe"}, tmp_path)
        assert first["o1"]["scores"]["key_points"] == 1.0 and len(server.requests) == 3
        again = judge.grade_all(ITEMS, {"o1": "spleen", "o2": "granuloma", "o3": "left lobe"}, tmp_path)
        assert len(server.requests) == 4  # only o1, whose answer changed
        assert "Candidate answer:\nspleen" in server.requests[3]["messages"][1]["content"]
        assert again["o1"]["scores"]["key_points"] == 5.0
        assert again["o2"] == first["o2"]
        # a later run reads the newest grade of each item from the file
        judge.grade_all(ITEMS, {"o1": "spleen", "o2": "granuloma", "o3": "left lobe"}, tmp_path)
        assert len(server.requests) == 4
        judge.close()


GRADE = {"key_points": [], "reasoning_steps": [], "evidence": [], "scores": GOOD}


@pytest.mark.parametrize(
    "reply",
    [
        "Here is my grading:\n" + json.dumps(GRADE),
        "```json\n" + json.dumps(GRADE) + "\n```\nNote: the answer is close.",
        "<think>the reference says {spleen}...</think>\n" + json.dumps(GRADE),
        "Sure!\n```\n" + json.dumps(GRADE) + "\n```",
        'Graded {"note": 1} then ' + json.dumps(GRADE) + " done",  # the first object holding "scores"
    ],
)
def test_parse_grade_finds_the_json_around_prose_fences_and_think(reply: str) -> None:
    assert parse_grade(reply)["scores"] == {"key_points": 5.0, "reasoning": 5.0, "evidence": 5.0}


def test_parse_grade_rejects_boolean_scores() -> None:
    reply = json.dumps({"scores": {"key_points": True, "reasoning": 1, "evidence": 1}})
    with pytest.raises(JudgeReplyError, match=r"scores.key_points must be a number from 0 to 5, got True"):
        parse_grade(reply)
    with pytest.raises(JudgeReplyError, match="the reply is empty"):
        parse_grade("<think>nothing else</think>")


def test_multiple_choice_items_are_judged_with_their_options(tmp_path: Path) -> None:
    mc = VQAItem(
        "m1",
        (),
        "What imaging modality is shown?",
        "CT scan",
        "closed",
        choices=(("A", "MRI"), ("B", "CT scan"), ("C", "Ultrasound")),
        answer_label="B",
    )
    with JudgeServer() as server:
        judge = judge_for(server)
        grades = judge.grade_all([mc], {"m1": "B: CT scan"}, tmp_path, kinds=("open", "closed", "choice"))
        prompt = server.requests[0]["messages"][1]["content"]
        assert "What imaging modality is shown?\nOptions:\nA: MRI\nB: CT scan\nC: Ultrasound" in prompt
        assert "Reference answer:\nB: CT scan\n\nCandidate answer:\nB: CT scan" in prompt
        assert grades["m1"]["scores"]["key_points"] == 5.0
        # a grade stored before the options were sent (digest of the bare answer) is not reused
        path = tmp_path / judge.file_name()
        old = {**grades["m1"], "answer_sha1": hashlib.sha1(b"B: CT scan").hexdigest()[:16]}
        path.write_text(json.dumps(old) + "\n")
        judge.grade_all([mc], {"m1": "B: CT scan"}, tmp_path, kinds=("choice",))
        assert len(server.requests) == 2
        judge.grade_all([mc], {"m1": "B: CT scan"}, tmp_path, kinds=("choice",))
        assert len(server.requests) == 2  # ... and the new grade is
        judge.close()


def test_an_unusable_judge_leaves_the_strict_report_in_place(tmp_path: Path) -> None:
    es = EvalSet("private", "test", list(ITEMS))
    with JudgeServer(script=[401]) as server:
        judge = judge_for(server)
        with pytest.raises(
            JudgeError, match=r"HTTP 401.*the strict report, without judge grades, is in place"
        ):
            evaluate(es, Says, tmp_path, model="m", judge=judge, n_boot=10)
        results = json.loads((tmp_path / "results.json").read_text())
        assert results["judge"] is None and results["metrics"]["closed_accuracy"]["value"] == 1.0
        assert (tmp_path / "results.md").is_file() and (tmp_path / "errors.jsonl").is_file()
        # the judge back: the same run rewrites the report with its grades
        out = evaluate(es, Says, tmp_path, model="m", judge=judge, n_boot=10)
        assert out.judge["n"] == 3
        assert json.loads((tmp_path / "results.json").read_text())["judge"]["n"] == 3
        judge.close()
