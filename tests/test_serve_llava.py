"""The LLaVA protocol: a controller, two workers with different checkpoints, and a plain HTTP client."""

from __future__ import annotations

import itertools
import time

import httpx
import pytest
from serve_helpers import b64, image, png_bytes, save_tiny_model

from cambrian_core.serve.controller import Controller
from cambrian_core.serve.errors import SERVER_ERROR_MSG
from cambrian_core.serve.protocol import chunk, iter_chunks


def wait_for(predicate, timeout: float = 20.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


def post(url: str, path: str, body: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60, **kw)


def stream(url: str, body: dict) -> tuple[int, list[dict]]:
    with httpx.stream("POST", url + "/worker_generate_stream", json=body, timeout=60) as r:
        return r.status_code, list(iter_chunks(r.iter_bytes()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from cambrian_core.model.io import load_model
    from cambrian_core.serve.controller import create_app as controller_app
    from cambrian_core.serve.engine import InferenceEngine
    from cambrian_core.serve.model_worker import ModelWorker
    from cambrian_core.serve.model_worker import create_app as worker_app
    from cambrian_core.serve.server import BackgroundServer, free_port

    root = tmp_path_factory.mktemp("llava")
    # The expiry is short for the expiry test, yet 15 missed 0.2 s heartbeats long, so a busy 2-core CI host
    # does not drop live workers in the other tests.
    controller = Controller(heart_beat_expiration=3.0)
    servers, workers = [], {}
    ctl = BackgroundServer(controller_app(controller)).start()
    servers.append(ctl)
    try:
        for name, seed in (("tiny-a", 2), ("tiny-b", 3)):
            engine = InferenceEngine(load_model(save_tiny_model(root / name, seed)), name=name, max_images=2)
            port = free_port()
            worker = ModelWorker(engine, ctl.url, f"http://127.0.0.1:{port}", heart_beat_interval=0.2)
            servers.append(BackgroundServer(worker_app(worker), port=port).start())
            workers[name] = worker
        wait_for(lambda: controller.list_models() == ["tiny-a", "tiny-b"])
        yield ctl.url, controller, workers
    finally:
        for s in reversed(servers):
            s.stop()
        for w in workers.values():
            w.engine.shutdown()


def test_both_checkpoints_are_listed_and_dispatched(cluster):
    url, _, workers = cluster
    assert post(url, "/list_models").json() == {"models": ["tiny-a", "tiny-b"]}
    for name, worker in workers.items():
        assert post(url, "/get_worker_address", {"model": name}).json() == {"address": worker.worker_address}
    assert post(url, "/get_worker_address", {"model": "nope"}).json() == {"address": ""}
    status = post(url, "/worker_get_status").json()
    assert status["model_names"] == ["tiny-a", "tiny-b"] and status["speed"] == 2


def llava_prompt(worker, question: str) -> str:
    """What a LLaVA web server sends: the conversation already templated, with an <image> marker."""
    from cambrian_core.model.template import Message

    return worker.engine.template.render_text(
        [Message("user", f"<image>\n{question}")], add_generation_prompt=True
    )


def test_stream_through_the_controller_follows_the_llava_wire_format(cluster):
    url, _, workers = cluster
    png = png_bytes(seed=5)
    answers = {}
    for name, worker in workers.items():
        prompt = llava_prompt(worker, "What is in the image?")
        body = {
            "model": name,
            "prompt": prompt,
            "images": [b64(png)],
            "temperature": 0.0,
            "top_p": 1.0,
            "max_new_tokens": 12,
            "stop": None,
            "min_tokens": 12,
        }
        with httpx.stream("POST", url + "/worker_generate_stream", json=body, timeout=60) as r:
            assert r.status_code == 200
            raw = b"".join(r.iter_bytes())
        assert raw.endswith(b"\0")
        chunks = list(iter_chunks([raw]))
        assert len(chunks) >= 3 and all(c["error_code"] == 0 for c in chunks)
        assert all(c["text"].startswith(prompt) for c in chunks)  # LLaVA echoes the prompt, cumulatively
        texts = [c["text"][len(prompt) :] for c in chunks]
        assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
        from cambrian_core.serve.images import image_from_bytes

        direct = worker.engine.generate(
            [{"role": "user", "content": "<image>\nWhat is in the image?"}],
            [image_from_bytes(png)],
            max_new_tokens=12,
            min_tokens=12,
        )
        assert texts[-1] == direct.text
        assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 12
        answers[name] = texts[-1]
    assert answers["tiny-a"] != answers["tiny-b"]  # two different checkpoints really answered


def test_messages_and_echo_false_extensions(cluster):
    _, _, workers = cluster
    worker = workers["tiny-a"]
    body = {
        "model": "tiny-a",
        "messages": [{"role": "user", "content": "<image>\nWhat is in the image?"}],
        "images": [b64(png_bytes(seed=5))],
        "temperature": 0,
        "max_new_tokens": 12,
        "min_tokens": 12,
        "echo": False,
    }
    status, chunks = stream(worker.worker_address, body)
    prompt = llava_prompt(worker, "What is in the image?")
    status2, chunks2 = stream(
        worker.worker_address, {**body, "messages": None, "prompt": prompt, "echo": True}
    )
    assert status == status2 == 200
    assert chunks[-1]["text"] == chunks2[-1]["text"][len(prompt) :]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"prompt": "<image> hi", "images": ["@@@"]}, 400, "not valid base64"),
        ({"prompt": "<image> hi", "images": [b64(b"plain text, no pixels here")]}, 400, "is not an image"),
        (
            {"prompt": "<image> <image> <image> hi", "images": [b64(png_bytes(seed=k)) for k in range(3)]},
            400,
            "too many images: 3",
        ),
        ({"prompt": "hi", "images": [b64(png_bytes())]}, 400, "0 <image> marker(s) but 1 image(s)"),
        ({"prompt": "word " * 600}, 400, "the model's context is 512"),
        ({"prompt": "hi", "model": "other"}, 404, "not 'other'"),
        ({"prompt": "hi", "temperature": "hot"}, 400, "`temperature` must be a number"),
    ],
)
def test_bad_worker_requests_get_a_4xx_and_the_worker_keeps_serving(cluster, body, status, message):
    _, _, workers = cluster
    worker = workers["tiny-a"]
    r = post(worker.worker_address, "/worker_generate_stream", body)
    assert r.status_code == status
    assert message in r.json()["text"] and r.json()["error_code"] == 4
    ok, chunks = stream(worker.worker_address, {"prompt": "hi", "max_new_tokens": 2, "temperature": 0})
    assert ok == 200 and chunks[-1]["error_code"] == 0


def test_unknown_model_through_the_controller_is_error_code_2(cluster):
    url, _, _ = cluster
    r = post(url, "/worker_generate_stream", {"model": "nope", "prompt": "hi"})
    assert r.status_code == 404
    assert r.json()["error_code"] == 2 and "no worker serves model 'nope'" in r.json()["text"]


def test_shortest_queue_and_lottery_dispatch():
    ctl = Controller("shortest_queue")
    ctl.register_worker("http://w1", True, {"model_names": ["m"], "speed": 1, "queue_length": 2})
    ctl.register_worker("http://w2", True, {"model_names": ["m"], "speed": 1, "queue_length": 0})
    ctl.register_worker("http://w3", True, {"model_names": ["x"], "speed": 5, "queue_length": 0})
    picks = [ctl.get_worker_address("m") for _ in range(4)]
    # w2 has the shorter queue until the optimistic increments make them equal, then they alternate
    assert picks[:2] == ["http://w2", "http://w2"] and sorted(picks[2:]) == ["http://w1", "http://w2"]
    assert ctl.receive_heart_beat("http://w1", 0) and not ctl.receive_heart_beat("http://unknown", 0)
    lot = Controller("lottery", seed=0)
    lot.register_worker("http://fast", True, {"model_names": ["m"], "speed": 9, "queue_length": 0})
    lot.register_worker("http://slow", True, {"model_names": ["m"], "speed": 1, "queue_length": 0})
    picks = [lot.get_worker_address("m") for _ in range(400)]
    assert 0.82 < picks.count("http://fast") / 400 < 0.97
    with pytest.raises(ValueError, match="choose one of lottery, shortest_queue"):
        Controller("round_robin")


def test_expiry_drops_a_silent_worker_and_a_heartbeat_re_registers_it():
    ctl = Controller(heart_beat_expiration=0.3)
    ctl.register_worker("http://w", True, {"model_names": ["m"], "speed": 1, "queue_length": 0})
    ctl.register_worker("http://static", False, {"model_names": ["s"], "speed": 1, "queue_length": 0})
    ctl.start()
    try:
        wait_for(lambda: "m" not in ctl.list_models(), timeout=5)
        assert ctl.list_models() == ["s"]  # workers registered without heartbeat checks stay
    finally:
        ctl.stop()


def test_refresh_drops_workers_that_no_longer_answer(cluster):
    url, _controller, _ = cluster
    post(
        url,
        "/register_worker",
        {
            "worker_name": "http://127.0.0.1:9",
            "check_heart_beat": False,
            "worker_status": {"model_names": ["ghost"], "speed": 1, "queue_length": 0},
        },
    )
    assert "ghost" in post(url, "/list_models").json()["models"]
    post(url, "/refresh_all_workers")
    assert "ghost" not in post(url, "/list_models").json()["models"]
    # a live worker that a stall made miss its heartbeats registers again at its next beat
    wait_for(lambda: post(url, "/list_models").json() == {"models": ["tiny-a", "tiny-b"]}, timeout=10)


def test_a_worker_that_stops_beating_is_dropped_after_the_expiry(cluster):
    _, controller, workers = cluster
    worker = workers["tiny-b"]
    worker.stop()  # its heartbeats stop; the process stays up
    wait_for(lambda: controller.list_models() == ["tiny-a"], timeout=10)
    worker.start()  # registers again
    wait_for(lambda: controller.list_models() == ["tiny-a", "tiny-b"], timeout=10)


def test_chunk_format():
    assert chunk("hi") == b'{"text": "hi", "error_code": 0}\x00'
    assert list(
        iter_chunks([b'{"text": "a", "error_code": 0}\x00{"text": "ab",', b' "error_code": 0}\x00'])
    ) == [{"text": "a", "error_code": 0}, {"text": "ab", "error_code": 0}]
    assert SERVER_ERROR_MSG.startswith("**NETWORK ERROR")
    assert image().size == (40, 30)


def test_web_ui_lists_every_workers_model_and_answers_with_the_chosen_one(cluster):
    import argparse

    gradio_client = pytest.importorskip("gradio_client")
    from cambrian_core.serve.gradio_web_server import ControllerBackend, build_web
    from cambrian_core.serve.server import free_port
    from cambrian_core.serve.ui import _text_of, launch

    url, _, workers = cluster
    assert ControllerBackend(url).models() == ["tiny-a", "tiny-b"]
    args = argparse.Namespace(controller_url=url, model_list_mode="reload", share=False, moderate=False)
    demo = build_web(args)
    port = free_port()
    launch(demo, "127.0.0.1", port, block=False)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        info = client.view_api(return_format="dict", print_info=False)
        model_param = next(p for p in info["named_endpoints"]["/chat"]["parameters"] if p["label"] == "Model")
        assert "tiny-a" in str(model_param["python_type"]) and "tiny-b" in str(model_param["python_type"])
        for name, worker in workers.items():
            history, _ = client.predict(
                "Describe the findings.", [], None, "auto", "axial", 0.0, 1.0, 12, name, api_name="/chat"
            )
            expected = worker.engine.generate("Describe the findings.", [], max_new_tokens=12)
            assert _text_of(history[-1]["content"]) == expected.text.strip()
    finally:
        demo.close()


def test_the_controller_names_what_a_bad_registration_lacks(cluster):
    url, _, _ = cluster
    r = post(url, "/register_worker", {"worker": "http://127.0.0.1:1"})
    assert r.status_code == 400 and r.json() == {
        "text": 'send {"worker_name": "<the worker\'s URL>", ...}',
        "error_code": 4,
    }
    for status, message in (
        ({"speed": 1}, '"model_names" must be a list of non-empty strings, got None'),
        ({"model_names": [1]}, '"model_names" must be a list of non-empty strings, got [1]'),
        ({"model_names": ["m"], "speed": "fast"}, "\"speed\" must be a number >= 0, got 'fast'"),
        ({"model_names": ["m"], "queue_length": -1}, '"queue_length" must be a non-negative integer, got -1'),
    ):
        r = post(url, "/register_worker", {"worker_name": "http://127.0.0.1:1", "worker_status": status})
        assert r.status_code == 400 and r.json()["text"] == f"worker_status: {message}", status
    r = post(url, "/receive_heart_beat", {"name": "x"})
    assert r.status_code == 400 and "worker_name" in r.json()["text"]
    r = httpx.post(url + "/get_worker_address", content=b'{"model": tiny-a}', timeout=10)
    assert r.status_code == 400 and r.json()["text"].startswith(
        "the request body is not JSON: Expecting value"
    )
    r = httpx.post(url + "/register_worker", content=b"[1, 2]", timeout=10)
    assert r.status_code == 400 and r.json()["text"] == "the request body must be a JSON object, got list"
    # the client's bytes reach the worker as sent (NaN included), and the worker's refusal comes back
    raw = b'{"model": "tiny-a", "prompt": "hi", "temperature": NaN}'
    r = httpx.post(url + "/worker_generate_stream", content=raw, timeout=30)
    assert r.status_code == 400 and "temperature" in r.json()["text"]
    wait_for(lambda: post(url, "/list_models").json() == {"models": ["tiny-a", "tiny-b"]}, timeout=10)


def test_the_controller_caps_request_bodies_declared_or_chunked():
    from cambrian_core.serve.controller import create_app as controller_app
    from cambrian_core.serve.controller import default_max_body
    from cambrian_core.serve.server import BackgroundServer

    assert default_max_body() == 8 * 32 * 2**20 * 4 // 3 + 2**20  # a worker's default: 8 images of 32 MiB
    server = BackgroundServer(controller_app(Controller(), max_body=2**20)).start()
    try:

        def chunked():  # no Content-Length: counted as it arrives
            yield b'{"model": "tiny-a", "prompt": "'
            for _ in range(1100):
                yield b"x" * 1024
            yield b'"}'

        for path in ("/worker_generate_stream", "/register_worker"):
            r = httpx.post(server.url + path, content=chunked(), timeout=60)
            assert r.status_code == 413 and r.json() == {
                "text": "the request body is over 1 MiB",
                "error_code": 4,
            }, path
        r = post(server.url, "/worker_generate_stream", {"model": "tiny-a", "prompt": "x" * (2**20 + 10)})
        assert r.status_code == 413 and r.json()["text"] == "the request body is over 1 MiB"
        r = post(server.url, "/worker_generate_stream", {"model": "tiny-a", "prompt": "x" * 1000})
        assert r.status_code == 404 and "no worker serves model 'tiny-a'" in r.json()["text"]  # under the cap
    finally:
        server.stop()
