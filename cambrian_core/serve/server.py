"""Running an ASGI app with uvicorn: blocking (the commands) or on a background thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

__all__ = ["BackgroundServer", "free_port", "read_body", "run_app"]


async def read_body(request: Any, limit: int) -> bytes:
    """A request's body, refused with a 413 ``RequestError`` as soon as it passes ``limit`` bytes: a declared
    ``Content-Length`` is checked first, and a chunked body (which declares none) is counted as it arrives."""
    from cambrian_core.serve.errors import RequestError

    too_big = RequestError(f"the request body is over {limit / 2**20:.0f} MiB", status=413)
    declared = request.headers.get("content-length") or ""
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    parts, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise too_big
        parts.append(piece)
    return b"".join(parts)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _config(app: Any, host: str, port: int, log_level: str) -> Any:
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2, access_log=False
    )


def run_app(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` until interrupted."""
    import uvicorn

    uvicorn.Server(_config(app, host, port, log_level)).run()


class BackgroundServer:
    """``with BackgroundServer(app) as srv: httpx.get(srv.url + "/...")``; port 0 picks a free port."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.host = host
        self._server = uvicorn.Server(_config(app, host, port, log_level))
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # not the main thread
        self._thread = threading.Thread(target=self._server.run, name=f"uvicorn:{port}", daemon=True)
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(
                    f"the server on {self.host}:{self.port} failed to start (see the log above)"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"the server on {self.host}:{self.port} did not start within {timeout:.0f} s"
                )
            time.sleep(0.02)
        sockets = [s for srv in self._server.servers for s in srv.sockets]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
