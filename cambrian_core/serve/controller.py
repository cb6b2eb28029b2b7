"""The LLaVA controller: workers register and send heartbeats; clients ask which worker serves a model.

Same endpoints, request bodies and dispatch methods as LLaVA's (reference §E.2), so LLaVA clients and workers work
with it. Differences: the heartbeat expiry and the proxy's read timeout are options (LLaVA: fixed 30 s / 5 s);
a proxied stream that breaks ends with an ``error_code`` 3 chunk instead of a cut-off JSON fragment; an unknown
model is answered with HTTP 404 before anything is streamed.

``python -m cambrian_core.serve.controller --host 127.0.0.1 --port 21001``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import threading
import time
from collections.abc import Mapping
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cambrian_core.serve.errors import SERVER_ERROR_MSG, ErrorCode, RequestError
from cambrian_core.serve.flags import DISPATCH_METHODS, controller_arguments
from cambrian_core.serve.images import ImageLimits
from cambrian_core.serve.protocol import CONTROLLER_HEART_BEAT_EXPIRATION, aiter_complete, chunk
from cambrian_core.serve.server import read_body

__all__ = ["Controller", "WorkerInfo", "create_app", "main"]

log = logging.getLogger(__name__)


def status_problem(status: Any) -> str | None:
    """What is wrong with a worker's status object (``model_names``: non-empty strings; ``speed`` a finite number
    >= 0, where 0 or null count as 1; ``queue_length`` a non-negative integer), or ``None``."""
    if not isinstance(status, dict):
        return f"expected an object, got {type(status).__name__}"
    names = status.get("model_names")
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        return f'"model_names" must be a list of non-empty strings, got {names!r}'
    speed = status.get("speed", 1)
    if speed is not None and (
        isinstance(speed, bool) or not isinstance(speed, int | float) or not 0 <= speed < float("inf")
    ):
        return f'"speed" must be a number >= 0, got {speed!r}'
    queue = status.get("queue_length", 0)
    if isinstance(queue, bool) or not isinstance(queue, int) or queue < 0:
        return f'"queue_length" must be a non-negative integer, got {queue!r}'
    return None


@dataclasses.dataclass
class WorkerInfo:
    """What the controller knows about one worker (keyed by its URL)."""

    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heart_beat: float


class Controller:
    """Worker table, dispatch and heartbeat expiry (thread-safe)."""

    def __init__(
        self,
        dispatch_method: str = "shortest_queue",
        heart_beat_expiration: float = CONTROLLER_HEART_BEAT_EXPIRATION,
        status_timeout: float = 5.0,
        seed: int | None = None,
    ) -> None:
        if dispatch_method not in DISPATCH_METHODS:
            raise ValueError(
                f"dispatch method {dispatch_method!r}: choose one of {', '.join(DISPATCH_METHODS)}"
            )
        if heart_beat_expiration <= 0:
            raise ValueError(f"heart_beat_expiration must be > 0 seconds, got {heart_beat_expiration}")
        self.dispatch_method = dispatch_method
        self.heart_beat_expiration = heart_beat_expiration
        self.status_timeout = status_timeout
        self.workers: dict[str, WorkerInfo] = {}
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    # ------------------------------------------------------------------ worker table
    def register_worker(self, worker_name: str, check_heart_beat: bool, worker_status: dict | None) -> bool:
        """Add or refresh a worker; without ``worker_status`` its ``/worker_get_status`` is asked."""
        status = worker_status or self.get_worker_status(worker_name)
        if status is None:
            return False
        info = WorkerInfo(
            model_names=list(status["model_names"]),
            speed=float(status.get("speed", 1) or 1),
            queue_length=int(status.get("queue_length", 0)),
            check_heart_beat=bool(check_heart_beat),
            last_heart_beat=time.time(),
        )
        with self._lock:
            self.workers[worker_name] = info
        log.info("registered worker %s serving %s", worker_name, info.model_names)
        return True

    def get_worker_status(self, worker_name: str) -> dict | None:
        """The worker's own ``/worker_get_status`` answer, or ``None`` when it does not answer."""
        try:
            r = httpx.post(worker_name.rstrip("/") + "/worker_get_status", timeout=self.status_timeout)
            r.raise_for_status()
            status = r.json()
            problem = status_problem(status)
            if problem:
                raise ValueError(f"bad status {status!r}: {problem}")
            return status
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("worker %s did not answer /worker_get_status: %s", worker_name, exc)
            return None

    def remove_worker(self, worker_name: str) -> None:
        with self._lock:
            self.workers.pop(worker_name, None)

    def refresh_all_workers(self) -> None:
        """Re-ask every worker for its status; drop those that do not answer."""
        with self._lock:
            old = dict(self.workers)
        for name, info in old.items():
            if not self.register_worker(name, info.check_heart_beat, None):
                log.info("dropping worker %s: it no longer answers", name)
                self.remove_worker(name)

    def list_models(self) -> list[str]:
        """Sorted union of every live worker's model names."""
        with self._lock:
            return sorted({m for w in self.workers.values() for m in w.model_names})

    def get_worker_address(self, model_name: str) -> str:
        """A worker serving ``model_name`` chosen by the dispatch method, or ``""`` when there is none."""
        with self._lock:
            names = [n for n, w in self.workers.items() if model_name in w.model_names]
            if not names:
                return ""
            if self.dispatch_method == "lottery":
                speeds = [max(self.workers[n].speed, 1e-9) for n in names]
                return self._rng.choices(names, weights=speeds, k=1)[0]
            best = min(names, key=lambda n: self.workers[n].queue_length / max(self.workers[n].speed, 1e-9))
            self.workers[best].queue_length += 1  # optimistic, corrected by the next heartbeat
            return best

    def receive_heart_beat(self, worker_name: str, queue_length: int) -> bool:
        """Record a heartbeat; ``False`` tells an unknown worker to register again."""
        with self._lock:
            info = self.workers.get(worker_name)
            if info is None:
                return False
            info.queue_length = int(queue_length)
            info.last_heart_beat = time.time()
            return True

    def remove_stale_workers(self) -> list[str]:
        """Drop workers whose last heartbeat is older than the expiry; return their names."""
        cutoff = time.time() - self.heart_beat_expiration
        with self._lock:
            stale = [n for n, w in self.workers.items() if w.check_heart_beat and w.last_heart_beat < cutoff]
            for n in stale:
                del self.workers[n]
        for n in stale:
            log.info("dropped worker %s: no heartbeat for %.1f s", n, self.heart_beat_expiration)
        return stale

    def worker_api_get_status(self) -> dict[str, Any]:
        """Aggregate status, so a controller can register with another controller."""
        with self._lock:
            infos = list(self.workers.values())
        return {
            "model_names": sorted({m for w in infos for m in w.model_names}),
            "speed": sum(w.speed for w in infos),
            "queue_length": sum(w.queue_length for w in infos),
        }

    # ------------------------------------------------------------------ expiry thread
    def start(self) -> None:
        """Start the thread that drops workers after the heartbeat expiry."""
        if self._reaper is None:
            self._stop.clear()
            self._reaper = threading.Thread(target=self._reap, name="controller-heartbeat", daemon=True)
            self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(5)
            self._reaper = None

    def _reap(self) -> None:
        interval = min(max(self.heart_beat_expiration / 4, 0.05), 5.0)
        while not self._stop.wait(interval):
            self.remove_stale_workers()


def default_max_body() -> int:
    """The largest body a worker with default image limits accepts: every image at its byte limit, base64."""
    limits = ImageLimits()
    return limits.max_images * limits.max_bytes * 4 // 3 + 2**20


def create_app(controller: Controller, worker_timeout: float = 600.0, max_body: int | None = None) -> Any:
    """The controller's FastAPI app (``worker_timeout``: longest wait for the next proxied chunk; ``max_body``:
    bytes a request body may hold, default what a worker with default image limits accepts)."""
    limit = default_max_body() if max_body is None else max_body

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        controller.start()
        app.state.http = httpx.AsyncClient(timeout=httpx.Timeout(worker_timeout, connect=5.0))
        yield
        await app.state.http.aclose()
        controller.stop()

    app = FastAPI(title="cambrian controller", lifespan=lifespan)
    app.state.controller = controller

    async def body(request: Request, raw: bytes | None = None) -> dict[str, Any]:
        raw = await read_body(request, limit) if raw is None else raw  # a RequestError (413) past the limit
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise RequestError(f"the request body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}")
        return data

    @app.exception_handler(RequestError)
    async def refuse(request: Request, exc: RequestError) -> Response:
        return JSONResponse({"text": exc.message, "error_code": int(exc.error_code)}, status_code=exc.status)

    def bad_request(text: str) -> Response:
        return JSONResponse({"text": text, "error_code": int(ErrorCode.BAD_REQUEST)}, status_code=400)

    def worker_name(data: Mapping[str, Any]) -> str | None:
        name = data.get("worker_name")
        return name if isinstance(name, str) and name else None

    @app.post("/register_worker")
    async def register_worker(request: Request) -> Any:
        data = await body(request)
        name, status = worker_name(data), data.get("worker_status")
        if name is None:
            return bad_request('send {"worker_name": "<the worker\'s URL>", ...}')
        problem = None if status is None else status_problem(status)
        if problem:
            return bad_request(f"worker_status: {problem}")
        await asyncio.to_thread(controller.register_worker, name, data.get("check_heart_beat", True), status)
        return None

    @app.post("/refresh_all_workers")
    async def refresh_all_workers() -> None:
        await asyncio.to_thread(controller.refresh_all_workers)

    @app.post("/list_models")
    async def list_models() -> dict[str, list[str]]:
        return {"models": controller.list_models()}

    @app.post("/get_worker_address")
    async def get_worker_address(request: Request) -> dict[str, str]:
        data = await body(request)
        return {"address": controller.get_worker_address(str(data.get("model", "")))}

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request) -> Any:
        data = await body(request)
        name, queue = worker_name(data), data.get("queue_length", 0)
        if name is None or isinstance(queue, bool) or not isinstance(queue, int):
            return bad_request('send {"worker_name": "<the worker\'s URL>", "queue_length": <int>}')
        return {"exist": controller.receive_heart_beat(name, queue)}

    @app.post("/worker_get_status")
    async def worker_get_status() -> dict[str, Any]:
        return controller.worker_api_get_status()

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> Response:
        raw = await read_body(request, limit)
        params = await body(request, raw)
        model = str(params.get("model", ""))
        address = controller.get_worker_address(model)
        if not address:
            known = ", ".join(controller.list_models()) or "none"
            return JSONResponse(
                {
                    "text": f"no worker serves model {model!r}; models served now: {known}",
                    "error_code": int(ErrorCode.NO_WORKER),
                },
                status_code=404,
            )
        client: httpx.AsyncClient = app.state.http
        try:
            upstream = await client.send(
                client.build_request(  # the client's bytes as sent: the worker validates them
                    "POST",
                    address + "/worker_generate_stream",
                    content=raw,
                    headers={"content-type": "application/json"},
                ),
                stream=True,
            )
        except httpx.HTTPError as exc:
            log.warning("worker %s unreachable: %s", address, exc)
            return Response(
                chunk(f"{SERVER_ERROR_MSG} (worker unreachable)", ErrorCode.WORKER_TIMEOUT),
                media_type="application/octet-stream",
            )
        if upstream.status_code != 200:
            content = await upstream.aread()
            await upstream.aclose()
            return Response(
                content, status_code=upstream.status_code, media_type=upstream.headers.get("content-type")
            )

        async def relay() -> Any:
            try:
                async for c in aiter_complete(upstream.aiter_raw()):
                    yield c
            except (httpx.HTTPError, OSError) as exc:
                log.warning("stream from worker %s broke: %s", address, exc)
                yield chunk(SERVER_ERROR_MSG, ErrorCode.WORKER_TIMEOUT)
            finally:
                await upstream.aclose()

        return StreamingResponse(relay(), media_type="application/octet-stream")

    return app


def run(args: argparse.Namespace) -> int:
    """Serve the controller until interrupted."""
    from cambrian_core.serve.server import run_app

    controller = Controller(args.dispatch_method, args.heart_beat_expiration)
    max_body = None if args.max_body_mb is None else int(args.max_body_mb * 2**20)
    run_app(create_app(controller, args.worker_timeout, max_body), args.host, args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(
        prog="python -m cambrian_core.serve.controller", description=__doc__.split("\n")[0]
    )
    controller_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
