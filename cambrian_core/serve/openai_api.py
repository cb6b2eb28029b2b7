"""An OpenAI-compatible API: ``GET /v1/models`` and ``POST /v1/chat/completions`` (plain and SSE streaming).

Works with the official ``openai`` client (``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)``). Image
parts are ``{"type": "image_url", "image_url": {"url": "data:<mime>;base64,..."}}`` (PNG, JPEG, DICOM or NIfTI
bytes); local paths (``file://`` or absolute) only with ``--allow-local-files``; remote URLs are never fetched.
``frequency_penalty``, ``presence_penalty``, ``logit_bias`` and ``seed`` act as in OpenAI's API (the seed gives the
request its own random stream). Extensions a client may send in ``extra_body``: ``min_tokens`` (no end token or
stop string before it), ``repetition_penalty`` (as vLLM), and ``window`` / ``slice_axis`` /
``slice_index`` / ``frame`` for scans. Errors use OpenAI's ``{"error": {message, type, param, code}}`` shape.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cambrian_core.model.template import IMAGE_TOKEN
from cambrian_core.serve.engine import EngineError, InferenceEngine, SamplingParams
from cambrian_core.serve.errors import RequestError
from cambrian_core.serve.images import ImageLimits, image_from_url
from cambrian_core.serve.params import sampling_from, scan_options
from cambrian_core.serve.server import read_body

__all__ = ["create_app", "parse_chat_request"]

log = logging.getLogger(__name__)

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_UNSUPPORTED = ("tools", "functions", "logprobs", "top_logprobs", "response_format")


def _content_parts(content: Any, k: int) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if content is None:
        return []
    if not isinstance(content, list):
        raise RequestError(f"messages[{k}].content must be a string or a list of parts", param="messages")
    return content


def parse_chat_request(
    body: Mapping[str, Any], engine: InferenceEngine, limits: ImageLimits, allow_local_files: bool
) -> tuple[list[dict[str, str]], list[Any], SamplingParams]:
    """``(messages with <image> markers, images, sampling)`` of a chat-completions body (checked)."""
    model = body.get("model")
    if model != engine.name:
        raise RequestError(
            f"the model {model!r} does not exist; this server serves {engine.name!r} (see GET /v1/models)",
            status=404,
            param="model",
            code="model_not_found",
        )
    for key in _UNSUPPORTED:
        if key == "response_format" and body.get(key) == {"type": "text"}:  # OpenAI's default: plain text
            continue
        if body.get(key):
            raise RequestError(
                f"`{key}` is not supported by this server", param=key, code="unsupported_parameter"
            )
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError("only n=1 is supported", param="n", code="unsupported_parameter")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("`messages` must be a non-empty list", param="messages")
    urls: list[tuple[str, str]] = []
    messages = []
    for k, m in enumerate(raw):
        if not isinstance(m, Mapping) or m.get("role") not in _ROLES:
            raise RequestError(
                f"messages[{k}] needs a role of {', '.join(_ROLES)} and a content", param="messages"
            )
        pieces = []
        for j, part in enumerate(_content_parts(m.get("content"), k)):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text" and isinstance(part.get("text"), str):
                if IMAGE_TOKEN in part["text"]:
                    raise RequestError(
                        f"messages[{k}].content[{j}] contains the reserved marker {IMAGE_TOKEN}; send images as "
                        "image_url parts",
                        param="messages",
                    )
                pieces.append(part["text"])
            elif kind == "image_url":
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, Mapping) else spec
                if not isinstance(url, str):
                    raise RequestError(
                        f"messages[{k}].content[{j}].image_url needs a `url`", param="messages"
                    )
                urls.append((f"messages[{k}].content[{j}]", url))
                pieces.append(IMAGE_TOKEN)
            else:
                raise RequestError(
                    f"messages[{k}].content[{j}] must be a text or image_url part, got {part!r:.80}",
                    param="messages",
                )
        messages.append({"role": _ROLES[m["role"]], "content": "\n".join(pieces)})
    limits.check_count(len(urls))
    options = scan_options(body)
    images = [image_from_url(url, what, limits, options, allow_local_files) for what, url in urls]
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if not isinstance(body.get("stream", False), bool):
        raise RequestError(f"`stream` must be true or false, got {body['stream']!r}", param="stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and (
        not isinstance(stream_options, Mapping)
        or not isinstance(stream_options.get("include_usage", False), bool)
    ):
        raise RequestError(
            f'`stream_options` must be an object such as {{"include_usage": true}}, got {stream_options!r:.80}',
            param="stream_options",
        )
    return messages, images, sampling_from(body, key, 512, 1.0)


async def _collect_unless_disconnected(request: Request, handle: Any, poll: float = 0.25) -> str | None:
    """The whole answer, or ``None`` (the request cancelled) when the client disconnects first: uvicorn does not
    cancel a handler whose client left, so without this an abandoned request decodes to its full budget."""

    async def collect() -> str:
        return "".join([d async for d in handle.astream()])

    task = asyncio.ensure_future(collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                handle.cancel()
                return None
    finally:
        if not task.done():
            handle.cancel()
            task.cancel()


def _error(exc: RequestError) -> Any:
    kind = "authentication_error" if exc.status == 401 else "invalid_request_error"
    return JSONResponse(
        {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.code}},
        status_code=exc.status,
        headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None,
    )


class _KeyCheck:
    """The bearer-key check of every ``/v1`` route, as plain ASGI middleware: Starlette's ``BaseHTTPMiddleware``
    (``@app.middleware("http")``) hides a client's disconnect from the handlers, so an abandoned non-streaming
    request would decode to its full budget."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                message = "missing or incorrect API key: send `Authorization: Bearer <key>`"
                await _error(RequestError(message, status=401))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    engine: InferenceEngine,
    api_key: str | None = None,
    allow_local_files: bool = False,
    limits: ImageLimits | None = None,
) -> Any:
    """The API's FastAPI app around ``engine``."""

    limits = limits or ImageLimits(max_images=engine.max_images)
    max_body = limits.max_images * limits.max_bytes * 4 // 3 + 2**20
    created = int(time.time())
    app = FastAPI(title=f"cambrian OpenAI-compatible API ({engine.name})")
    app.state.engine = engine

    if api_key:
        app.add_middleware(_KeyCheck, api_key=api_key)

    def model_card() -> dict[str, Any]:
        return {"id": engine.name, "object": "model", "created": created, "owned_by": "cambrian"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        if model_id != engine.name:
            return _error(
                RequestError(f"the model {model_id!r} does not exist", 404, "model", "model_not_found")
            )
        return JSONResponse(model_card())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name, "queue_length": engine.queue_length}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            raw = await read_body(request, max_body)
            try:
                body = json.loads(raw)
            except ValueError:
                raise RequestError("the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise RequestError("the body must be a JSON object")
            messages, images, sampling = await asyncio.to_thread(
                parse_chat_request, body, engine, limits, allow_local_files
            )
            ids = await asyncio.to_thread(engine.tokenize_messages, messages, len(images))
            handle = engine.submit(ids, images, sampling, loop=asyncio.get_running_loop())
        except RequestError as exc:
            return _error(exc)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": now, "model": engine.name}

        def usage(res: Any) -> dict[str, int]:
            return {
                "prompt_tokens": res.prompt_tokens,
                "completion_tokens": res.completion_tokens,
                "total_tokens": res.prompt_tokens + res.completion_tokens,
            }

        def reason(res: Any) -> str:
            return "length" if res.finish_reason == "length" else "stop"

        if not body.get("stream"):
            try:
                text = await _collect_unless_disconnected(request, handle)
            except EngineError as exc:
                err = {
                    "message": str(exc),
                    "type": "server_error",
                    "param": None,
                    "code": "generation_failed",
                }
                return JSONResponse({"error": err}, status_code=500)
            if text is None:  # the client left: nobody to answer, and the request was cancelled
                return Response(status_code=499)
            res = handle.result
            return JSONResponse(
                {
                    **head,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": reason(res),
                            "logprobs": None,
                        }
                    ],
                    "usage": usage(res),
                }
            )

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def sse(choices: list[dict[str, Any]], **extra: Any) -> str:
            data = {**head, "object": "chat.completion.chunk", "choices": choices, **extra}
            return f"data: {json.dumps(data)}\n\n"

        async def events() -> Any:
            yield sse([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            try:
                async for delta in handle.astream():
                    yield sse([{"index": 0, "delta": {"content": delta}, "finish_reason": None}])
            except EngineError as exc:
                err = {
                    "message": str(exc),
                    "type": "server_error",
                    "param": None,
                    "code": "generation_failed",
                }
                yield f"data: {json.dumps({'error': err})}\n\n"
                yield "data: [DONE]\n\n"
                return
            res = handle.result
            yield sse([{"index": 0, "delta": {}, "finish_reason": reason(res)}])
            if include_usage:
                yield sse([], usage=usage(res))
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    return app


def run(args: argparse.Namespace) -> int:
    """Load the model and serve the API until interrupted."""
    import os

    from cambrian_core.serve.loading import load_for_serving, model_display_name
    from cambrian_core.serve.server import run_app

    model = load_for_serving(args.model, args.device, args.dtype, args.tower_path, args.quantize)
    engine = InferenceEngine(
        model,
        name=args.served_model_name or model_display_name(args.model),
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_images=args.max_images,
    )
    limits = ImageLimits(max_images=args.max_images, max_bytes=int(args.max_image_mb * 2**20))
    key = args.api_key or os.environ.get("CAMBRIAN_API_KEY") or None
    log.info(
        "serving %s on http://%s:%d/v1 (API key %s)",
        engine.name,
        args.host,
        args.port,
        "required" if key else "not required",
    )
    try:
        run_app(create_app(engine, key, args.allow_local_files, limits), args.host, args.port)
    finally:
        engine.shutdown()
    return 0
