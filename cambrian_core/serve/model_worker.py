"""The LLaVA model worker: serves one model over ``/worker_generate_stream`` and registers with a controller.

Wire format as in LLaVA (reference §E.3): the request is ``{model, prompt (templated, with <image> markers),
images: [base64], temperature, top_p, max_new_tokens, stop}``; the answer is a stream of NUL-terminated JSON
chunks ``{"text": prompt + generated so far, "error_code": 0}``. Additions that LLaVA clients never send:
``messages`` (role / content turns, templated here with the model's own template) instead of ``prompt``;
``echo: false`` (chunks without the prompt); ``min_tokens``; ``repetition_penalty``; ``window`` / ``slice_axis`` / ``slice_index`` /
``frame`` for DICOM / NIfTI images; the last chunk carries ``finish_reason`` and ``usage``. A bad request is answered
before streaming with an HTTP 4xx and ``{"text": <reason>, "error_code": 4}``.

``python -m cambrian_core.serve.model_worker --controller http://127.0.0.1:21001 --port 21002
--worker http://127.0.0.1:21002 --model-path cambrian-tiny-med``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Mapping
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cambrian_core.serve.engine import InferenceEngine, SamplingParams
from cambrian_core.serve.errors import SERVER_ERROR_MSG, ErrorCode, RequestError
from cambrian_core.serve.flags import worker_arguments
from cambrian_core.serve.images import (
    ImageLimits,
    decode_base64,
    image_from_bytes,
    image_from_url,
)
from cambrian_core.serve.params import sampling_from, scan_options
from cambrian_core.serve.protocol import WORKER_HEART_BEAT_INTERVAL, chunk
from cambrian_core.serve.server import read_body

__all__ = ["ModelWorker", "create_app", "main", "parse_generate_request"]

log = logging.getLogger(__name__)


def parse_generate_request(
    engine: InferenceEngine, params: Mapping[str, Any], limits: ImageLimits
) -> tuple[str, list[int], list[Any], SamplingParams]:
    """``(prompt text, token ids, images, sampling)`` of a ``/worker_generate_stream`` body (checked)."""
    images_b64 = params.get("images") or []
    if not isinstance(images_b64, list) or not all(isinstance(s, str) for s in images_b64):
        raise RequestError("`images` must be a list of base64 strings", param="images")
    limits.check_count(len(images_b64))
    options = scan_options(params)
    images = []
    for k, data in enumerate(images_b64):
        what = f"images[{k}]"
        if data.startswith("data:"):
            images.append(image_from_url(data, what, limits, options))
        else:
            images.append(image_from_bytes(decode_base64(data, what), what, limits, options))
    if params.get("messages") is not None:
        messages = params["messages"]
        if not isinstance(messages, list):
            raise RequestError("`messages` must be a list of {role, content} turns", param="messages")
        ids = engine.tokenize_messages(messages, len(images))
        prompt = engine.template.render_text([_as_message(m) for m in messages], add_generation_prompt=True)
    else:
        prompt = params.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("send a non-empty `prompt` string (or `messages`)", param="prompt")
        ids = engine.tokenize_prompt(prompt, len(images))
    sampling = sampling_from(params, "max_new_tokens", 256, 1.0, cap=1024)
    return prompt, ids, images, sampling


def _as_message(m: Any) -> Any:
    from cambrian_core.model.tokenize import to_messages

    return to_messages([m])[0]


class ModelWorker:
    """One engine, its registration with a controller and its heartbeats.

    Args:
        engine: the loaded model's engine.
        controller_address: controller URL (``None`` or ``no_register``: serve without one).
        worker_address: this worker's URL as the controller and clients reach it.
        heart_beat_interval: seconds between heartbeats.
        limits: image limits per request.
    """

    def __init__(
        self,
        engine: InferenceEngine,
        controller_address: str | None,
        worker_address: str,
        no_register: bool = False,
        heart_beat_interval: float = WORKER_HEART_BEAT_INTERVAL,
        limits: ImageLimits | None = None,
    ) -> None:
        self.engine = engine
        self.model_names = [engine.name]
        self.controller_address = (
            None if no_register or not controller_address else controller_address.rstrip("/")
        )
        self.worker_address = worker_address.rstrip("/")
        self.worker_id = uuid.uuid4().hex[:6]
        self.heart_beat_interval = heart_beat_interval
        self.limits = limits or ImageLimits(max_images=engine.max_images)
        self._stop = threading.Event()
        self._beat_now = threading.Event()
        self._thread: threading.Thread | None = None

    def get_status(self) -> dict[str, Any]:
        return {"model_names": self.model_names, "speed": 1, "queue_length": self.engine.queue_length}

    def register_to_controller(self) -> bool:
        if self.controller_address is None:
            return False
        data = {
            "worker_name": self.worker_address,
            "check_heart_beat": True,
            "worker_status": self.get_status(),
        }
        try:
            httpx.post(self.controller_address + "/register_worker", json=data, timeout=10).raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("could not register with the controller %s: %s", self.controller_address, exc)
            return False
        log.info("registered %s (%s) with %s", self.worker_address, self.model_names, self.controller_address)
        return True

    def send_heart_beat(self) -> None:
        """One heartbeat; re-register when the controller has forgotten this worker."""
        if self.controller_address is None:
            return
        try:
            r = httpx.post(
                self.controller_address + "/receive_heart_beat",
                json={"worker_name": self.worker_address, "queue_length": self.engine.queue_length},
                timeout=5,
            )
            exist = r.json().get("exist", False)
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("heartbeat to %s failed: %s", self.controller_address, exc)
            return
        if not exist:
            self.register_to_controller()

    def beat_soon(self) -> None:
        """Ask for a heartbeat now (queue length changed)."""
        self._beat_now.set()

    def start(self) -> None:
        if self.controller_address is None or self._thread is not None:
            return
        self.register_to_controller()
        self._stop.clear()
        self._thread = threading.Thread(target=self._heart_beats, name="worker-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._beat_now.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _heart_beats(self) -> None:
        while not self._stop.is_set():
            self._beat_now.wait(self.heart_beat_interval)
            self._beat_now.clear()
            if not self._stop.is_set():
                self.send_heart_beat()


def create_app(worker: ModelWorker) -> Any:
    """The worker's FastAPI app."""
    engine = worker.engine

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        await asyncio.to_thread(worker.start)
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title=f"cambrian model worker ({engine.name})", lifespan=lifespan)
    app.state.worker = worker
    # the largest legitimate body: every image at its byte limit, base64-encoded, plus 1 MiB of text
    max_body = worker.limits.max_images * worker.limits.max_bytes * 4 // 3 + 2**20

    def refuse(exc: RequestError) -> Response:
        return JSONResponse(
            {"text": exc.message, "error_code": int(exc.error_code), "error": exc.code},
            status_code=exc.status,
        )

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> Response:
        try:
            raw = await read_body(request, max_body)
            try:
                params = json.loads(raw)
            except ValueError:
                raise RequestError("the body is not valid JSON") from None
            if not isinstance(params, dict):
                raise RequestError("the body must be a JSON object")
            model = params.get("model")
            if model is not None and model not in worker.model_names:
                raise RequestError(
                    f"this worker serves {worker.model_names}, not {model!r}",
                    status=404,
                    param="model",
                    code="model_not_found",
                )
            prompt, ids, images, sampling = await asyncio.to_thread(
                parse_generate_request, engine, params, worker.limits
            )
            handle = engine.submit(ids, images, sampling, loop=asyncio.get_running_loop())
        except RequestError as exc:
            return refuse(exc)
        echo = prompt if params.get("echo", True) else ""
        worker.beat_soon()

        async def stream() -> Any:
            text = ""
            try:
                async for delta in handle.astream():
                    text += delta
                    yield chunk(echo + text)
                res = handle.result
                usage = {
                    "prompt_tokens": res.prompt_tokens,
                    "completion_tokens": res.completion_tokens,
                    "total_tokens": res.prompt_tokens + res.completion_tokens,
                }
                yield chunk(echo + res.text, finish_reason=res.finish_reason, usage=usage)
            except Exception as exc:  # the model failed mid-stream
                log.warning("request %s failed: %s", handle.id, exc)
                yield chunk(f"{SERVER_ERROR_MSG}\n\n({exc})", ErrorCode.WORKER_ERROR)
            finally:
                worker.beat_soon()

        return StreamingResponse(stream(), media_type="application/octet-stream")

    @app.post("/worker_get_status")
    async def worker_get_status() -> dict[str, Any]:
        return worker.get_status()

    @app.post("/model_details")
    async def model_details() -> dict[str, Any]:
        return {
            "model_names": worker.model_names,
            "context_length": engine.context_length,
            "image_tokens": engine.image_tokens,
            "template": getattr(engine.template, "name", ""),
            "max_images": worker.limits.max_images,
        }

    @app.post("/count_token")
    async def count_token(request: Request) -> Response:
        try:
            params = await request.json()
            return JSONResponse({"count": engine.count_tokens(str(params["prompt"])), "error_code": 0})
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            return JSONResponse({"text": 'send {"prompt": str}', "error_code": 4}, status_code=400)

    return app


def build_worker(args: argparse.Namespace) -> ModelWorker:
    """Load the model and wrap it in an engine and a worker, as the flags say."""
    from cambrian_core.serve.loading import load_for_serving, model_display_name

    if getattr(args, "model_base", None):
        raise SystemExit(
            "--model-base (LoRA on a base model) is not supported: merge first with `cambrian export`"
        )
    model = load_for_serving(args.model_path, args.device, args.dtype, args.tower_path, args.quantize)
    engine = InferenceEngine(
        model,
        name=args.model_name or model_display_name(args.model_path),
        max_batch_size=args.limit_model_concurrency,
        max_queue=args.max_queue,
        max_images=args.max_images,
    )
    limits = ImageLimits(max_images=args.max_images, max_bytes=int(args.max_image_mb * 2**20))
    return ModelWorker(
        engine,
        args.controller_address,
        args.worker_address or f"http://{args.host}:{args.port}",
        no_register=args.no_register,
        heart_beat_interval=args.heart_beat_interval,
        limits=limits,
    )


def run(args: argparse.Namespace) -> int:
    """Serve the worker until interrupted."""
    from cambrian_core.serve.server import run_app

    worker = build_worker(args)
    try:
        run_app(create_app(worker), args.host, args.port)
    finally:
        worker.engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(
        prog="python -m cambrian_core.serve.model_worker", description=__doc__.split("\n")[0]
    )
    worker_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
