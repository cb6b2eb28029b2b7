"""The OpenAI-compatible API against the official ``openai`` client, and every kind of bad request."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
from serve_helpers import b64, ct_small, data_url, png_bytes, save_tiny_model

openai = pytest.importorskip("openai")

KEY = "test-key-123"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from cambrian_core.model.io import load_model
    from cambrian_core.serve.engine import InferenceEngine

    folder = save_tiny_model(tmp_path_factory.mktemp("api") / "tiny-a", seed=2)
    eng = InferenceEngine(load_model(folder), name="tiny-a", max_batch_size=4, max_images=2)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    from cambrian_core.serve.images import ImageLimits
    from cambrian_core.serve.openai_api import create_app
    from cambrian_core.serve.server import BackgroundServer

    limits = ImageLimits(max_images=2, max_bytes=64 * 1024, max_pixels=1_000_000)
    with BackgroundServer(create_app(engine, api_key=KEY, limits=limits)) as srv:
        yield srv


@pytest.fixture(scope="module")
def local_server(engine):
    from cambrian_core.serve.openai_api import create_app
    from cambrian_core.serve.server import BackgroundServer

    with BackgroundServer(create_app(engine, allow_local_files=True)) as srv:
        yield srv


@pytest.fixture()
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    yield c
    c.close()


def user(text: str, *images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny-a"]


def test_chat_completion_matches_the_engine_and_counts_usage(client, engine):
    from cambrian_core.serve.images import image_from_bytes

    png = png_bytes(seed=3)
    out = client.chat.completions.create(
        model="tiny-a", messages=user("What is in the image?", data_url(png)), max_tokens=12, temperature=0
    )
    direct = engine.generate(
        [{"role": "user", "content": "<image>\nWhat is in the image?"}],
        [image_from_bytes(png)],
        max_new_tokens=12,
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == direct.text
    assert choice.finish_reason == ("length" if direct.finish_reason == "length" else "stop")
    assert out.usage.completion_tokens == direct.completion_tokens >= 1
    assert out.usage.prompt_tokens == direct.prompt_tokens
    # one image takes grid*(grid+1) positions on top of the text tokens
    assert out.usage.prompt_tokens > engine.image_tokens
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streaming_gives_the_same_text_and_usage(client):
    msgs = user("Describe the findings.", data_url(png_bytes(seed=4)))
    plain = client.chat.completions.create(
        model="tiny-a", messages=msgs, max_tokens=16, temperature=0, extra_body={"min_tokens": 16}
    )
    stream = client.chat.completions.create(
        model="tiny-a",
        messages=msgs,
        max_tokens=16,
        temperature=0,
        extra_body={"min_tokens": 16},
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_max_tokens_stop_and_sampling_settings(client, engine):
    msgs = user("Is there a fracture?")
    no_end = {str(t): -100 for t in engine.stop_token_ids}  # (min_tokens would hold back stop strings too)
    long = client.chat.completions.create(
        model="tiny-a", messages=msgs, max_tokens=20, temperature=0, logit_bias=no_end
    )
    assert long.usage.completion_tokens == 20 and long.choices[0].finish_reason == "length"
    text = long.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "need a printable stop string"
    cut = client.chat.completions.create(
        model="tiny-a",
        messages=msgs,
        max_tokens=20,
        temperature=0,
        stop=[stop],
        logit_bias=no_end,
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    sampled = client.chat.completions.create(
        model="tiny-a", messages=msgs, max_tokens=8, temperature=0.9, top_p=0.8
    )
    assert sampled.usage.completion_tokens <= 8


def test_concurrent_requests_equal_sequential_ones(client):
    prompts = [user(f"question {k}?", data_url(png_bytes(seed=10 + k))) for k in range(4)]

    def ask(msgs):
        r = client.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=10, temperature=0)
        return r.choices[0].message.content

    sequential = [ask(m) for m in prompts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        concurrent_ = list(pool.map(ask, prompts))
    assert concurrent_ == sequential


def test_dicom_data_url_is_read_as_a_scan(local_server):
    from pathlib import Path

    c = openai.OpenAI(base_url=local_server.url + "/v1", api_key="unused", max_retries=0)
    dcm = Path(ct_small()).read_bytes()
    r = c.chat.completions.create(
        model="tiny-a",
        messages=user("Which organ?", data_url(dcm, "application/dicom")),
        max_tokens=4,
        temperature=0,
        extra_body={"window": "abdomen"},
    )
    assert r.usage.completion_tokens >= 1
    # a local path is accepted only by a server started with --allow-local-files
    r2 = c.chat.completions.create(
        model="tiny-a",
        messages=user("Which organ?", ct_small()),
        max_tokens=4,
        temperature=0,
        extra_body={"window": "abdomen"},
    )
    assert r2.choices[0].message.content == r.choices[0].message.content
    c.close()


def post(server, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


BAD = [
    ("invalid base64", user("hi", "data:image/png;base64,@@not-base64@@"), 400, "not valid base64"),
    (
        "not an image",
        user("hi", data_url(b"hello, this is text and not pixels " * 4)),
        400,
        "is not an image",
    ),
    (
        "too large",
        user("hi", data_url(png_bytes(300, 300, seed=1) + b"\0" * 70_000)),
        413,
        "the limit is 0.1 MiB",
    ),
    ("too many", user("hi", *[data_url(png_bytes(seed=k)) for k in range(3)]), 400, "too many images: 3"),
    ("over context", user("finding " * 600), 400, "the model's context is 512"),
    ("remote url", user("hi", "https://example.com/x.png"), 400, "remote URLs are not fetched"),
    ("local path refused", user("hi", ct_small()), 403, "local file paths are disabled"),
    ("image in text", user("look <image> here"), 400, "reserved marker <image>"),
    ("bad role", [{"role": "robot", "content": "hi"}], 400, "needs a role"),
]


@pytest.mark.parametrize(("case", "messages", "status", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_with_a_clear_message_and_the_server_keeps_serving(
    server, case, messages, status, message
):
    r = post(server, {"model": "tiny-a", "messages": messages, "max_tokens": 4})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"]
    assert err["type"] == "invalid_request_error"
    ok = post(
        server, {"model": "tiny-a", "messages": user("still there?"), "max_tokens": 2, "temperature": 0}
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_unknown_model_bad_json_and_bad_settings(server, client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=user("hi"))
    with pytest.raises(openai.BadRequestError, match="temperature must be in"):
        client.chat.completions.create(model="tiny-a", messages=user("hi"), temperature=5)
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.chat.completions.create(model="tiny-a", messages=user("hi"), n=2)
    r = post(server, {"model": "tiny-a", "messages": user("hi"), "n": True})  # true == 1 in Python
    assert r.status_code == 400 and "only n=1" in r.json()["error"]["message"]
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = post(server, {"model": "tiny-a", "messages": user("hi", b64(b"abc"))})
    assert r.status_code == 400


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        bad.models.list()
    assert post(server, {"model": "tiny-a", "messages": user("hi")}, key=None).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # only /v1 is guarded
    bad.close()


def test_chunked_bodies_stream_options_and_budgets_are_checked(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny-a", "messages": [], "pad": "'
        for _ in range(1300):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(server.url + "/v1/chat/completions", content=chunked(), headers=headers, timeout=60)
    assert r.status_code == 413 and "the request body is over 1 MiB" in r.json()["error"]["message"]
    r = post(server, {"model": "tiny-a", "messages": user("hi"), "stream": True, "stream_options": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    assert "`stream_options` must be an object" in r.json()["error"]["message"]
    r = post(server, {"model": "tiny-a", "messages": user("hi"), "stream": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    for key in ("max_tokens", "max_completion_tokens"):
        r = post(server, {"model": "tiny-a", "messages": user("hi"), key: 0})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == key
        assert err["message"] == f"`{key}` must be an integer >= 1, got 0"


def test_a_client_that_leaves_cancels_its_non_streaming_request():
    import asyncio

    from cambrian_core.serve.openai_api import _collect_unless_disconnected

    class Handle:
        cancelled = False

        def cancel(self):
            self.cancelled = True

        async def astream(self):
            while not self.cancelled:  # an answer that would run to its full budget
                yield "x"
                await asyncio.sleep(0.01)

    class Gone:
        polls = 0

        async def is_disconnected(self):
            self.polls += 1
            return self.polls >= 2

    class Stays:
        async def is_disconnected(self):
            return False

    class Short(Handle):
        async def astream(self):
            yield "a"
            yield "b"

    handle = Handle()
    assert asyncio.run(_collect_unless_disconnected(Gone(), handle, poll=0.02)) is None
    assert handle.cancelled
    short = Short()
    assert asyncio.run(_collect_unless_disconnected(Stays(), short, poll=0.02)) == "ab"
    assert not short.cancelled


def test_through_the_key_check_a_client_that_leaves_still_cancels_its_request(engine, server, monkeypatch):
    """The real server with --api-key: the key check must not hide the disconnect from the handler."""
    import time

    real = engine.model.decode_step

    def slow(*args, **kwargs):
        time.sleep(0.05)  # 400 tokens: ~20 s if nobody cancels
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.model, "decode_step", slow)
    body = {"model": "tiny-a", "messages": user("hi"), "max_tokens": 400, "min_tokens": 400, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            server.url + "/v1/chat/completions",
            json=body,
            timeout=1,
            headers={"Authorization": f"Bearer {KEY}"},
        )
    left = time.monotonic()
    while engine.queue_length and time.monotonic() - left < 15:
        time.sleep(0.1)
    assert engine.queue_length == 0 and time.monotonic() - left < 10


def test_openai_sampling_fields_act_and_the_default_response_format_is_accepted(client):
    ask = dict(model="tiny-a", messages=user("Describe the findings."), max_tokens=12, temperature=1.0)
    seeded = [client.chat.completions.create(**ask, seed=7).choices[0].message.content for _ in range(2)]
    other = client.chat.completions.create(**ask, seed=8).choices[0].message.content
    assert seeded[0] == seeded[1] != other
    greedy = dict(ask, temperature=0.0, extra_body={"min_tokens": 12})
    plain = client.chat.completions.create(**greedy).choices[0].message.content
    for change in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        assert client.chat.completions.create(**greedy, **change).choices[0].message.content != plain
    text = (
        client.chat.completions.create(**greedy, response_format={"type": "text"}).choices[0].message.content
    )
    assert text == plain
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(**greedy, response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match=r"logit_bias must map token ids"):
        client.chat.completions.create(**greedy, logit_bias={"5": 500})
