"""The LLaVA serving protocol's wire format: NUL-delimited JSON stream chunks and heartbeat timings."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from cambrian_core.serve.errors import ErrorCode

__all__ = [
    "CONTROLLER_HEART_BEAT_EXPIRATION",
    "WORKER_HEART_BEAT_INTERVAL",
    "NulChunker",
    "chunk",
    "iter_chunks",
]


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


#: seconds without a heartbeat after which the controller drops a worker (LLaVA: 30)
CONTROLLER_HEART_BEAT_EXPIRATION = _env_seconds("CAMBRIAN_CONTROLLER_HEART_BEAT_EXPIRATION", 30.0)
#: seconds between a worker's heartbeats (LLaVA: 15)
WORKER_HEART_BEAT_INTERVAL = _env_seconds("CAMBRIAN_WORKER_HEART_BEAT_INTERVAL", 15.0)


def chunk(text: str, error_code: int = ErrorCode.OK, **extra: Any) -> bytes:
    """One stream chunk: ``{"text": ..., "error_code": ...}`` as UTF-8 JSON followed by a NUL byte."""
    return json.dumps({"text": text, "error_code": int(error_code), **extra}).encode() + b"\0"


class NulChunker:
    """Re-cut an arbitrary byte stream at NUL bytes (keeps the unfinished tail for the next ``feed``)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Complete chunks (NUL included) now available."""
        self._buf += data
        *done, self._buf = self._buf.split(b"\0")
        return [c + b"\0" for c in done]

    @property
    def pending(self) -> bytes:
        """Bytes of an unfinished chunk."""
        return self._buf


def iter_chunks(byte_stream: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """Parse a ``/worker_generate_stream`` body into dicts; a trailing chunk without NUL is parsed too."""
    cutter = NulChunker()
    for data in byte_stream:
        for c in cutter.feed(data):
            if c.strip(b"\0"):
                yield json.loads(c[:-1])
    if cutter.pending.strip():
        yield json.loads(cutter.pending)


async def aiter_complete(byte_stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Relay only complete NUL-terminated chunks of an async byte stream (a cut-off tail is dropped)."""
    cutter = NulChunker()
    async for data in byte_stream:
        for c in cutter.feed(data):
            yield c
