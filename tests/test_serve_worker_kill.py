"""A worker process killed mid-stream: the client gets an error code, the controller drops the worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from serve_helpers import save_tiny_model

from cambrian_core.serve.protocol import NulChunker


@pytest.mark.slow
def test_killed_worker_gives_error_code_3_and_is_dropped_after_the_expiry(tmp_path):
    import json

    from cambrian_core.serve.controller import Controller, create_app
    from cambrian_core.serve.server import BackgroundServer, free_port

    folder = save_tiny_model(tmp_path / "tiny-k", seed=3)
    controller = Controller(heart_beat_expiration=1.5)
    port = free_port()
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115
    with BackgroundServer(create_app(controller)) as ctl:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cambrian_core.serve.model_worker",
                "--model-path",
                folder,
                "--port",
                str(port),
                "--worker",
                f"http://127.0.0.1:{port}",
                "--controller",
                ctl.url,
                "--device",
                "cpu",
                "--heart-beat-interval",
                "0.3",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.monotonic() + 120
            while controller.list_models() != ["tiny-k"]:
                assert proc.poll() is None, (tmp_path / "worker.log").read_text()
                assert time.monotonic() < deadline, "the worker did not register within 120 s"
                time.sleep(0.1)
            body = {
                "model": "tiny-k",
                "prompt": "What is in the image?",
                "max_new_tokens": 1024,
                "min_tokens": 1024,
                "temperature": 0,
                "echo": False,
            }
            chunks, cutter = [], NulChunker()
            with httpx.stream("POST", ctl.url + "/worker_generate_stream", json=body, timeout=60) as r:
                assert r.status_code == 200
                for data in r.iter_raw():
                    chunks += [json.loads(c[:-1]) for c in cutter.feed(data)]
                    if chunks and proc.poll() is None:
                        proc.send_signal(signal.SIGKILL)  # mid-stream: 1024 tokens were asked for
            assert proc.wait(10) == -signal.SIGKILL
            assert chunks[0]["error_code"] == 0
            assert chunks[-1]["error_code"] == 3, chunks[-1]
            assert "NETWORK ERROR" in chunks[-1]["text"]
            assert "finish_reason" not in chunks[-2]  # the answer really was cut off
            t0 = time.monotonic()
            while controller.list_models():
                assert time.monotonic() - t0 < 10, "the dead worker was not dropped"
                time.sleep(0.05)
            r = httpx.post(ctl.url + "/worker_generate_stream", json=body, timeout=10)
            assert r.status_code == 404 and r.json()["error_code"] == 2
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            log.close()
