"""A small, robust client for OpenAI-compatible ``/chat/completions`` endpoints.

What MultiViewDx lacked (reference §G.3): a bound on concurrent requests, retries with exponential backoff and
jitter on 429 / 5xx / timeouts / dropped connections that honour the server's ``Retry-After``, a clear error once
retries run out, and token accounting. Works with OpenAI, Azure-style gateways, vLLM, llama.cpp server, Ollama...
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from cambrian_core.data.generators.base import StopRun

__all__ = ["ChatAPIError", "ChatClient", "ChatResult", "EndpointError", "Usage", "resolve_setting"]

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
#: statuses no other request will escape: the key, the URL or the model name is wrong
_ENDPOINT_STATUS = {401, 403, 404}


class ChatAPIError(RuntimeError):
    """A chat request failed for good (non-retryable status, or retries exhausted)."""


class EndpointError(ChatAPIError, StopRun):
    """The endpoint refuses every request (HTTP 401 / 403 / 404: API key, URL or model name)."""


def resolve_setting(value: str | None, env: str, default: str | None = None) -> str | None:
    """``value`` from the config if given, else the environment variable ``env`` when non-empty, else ``default``.

    An empty environment variable never overrides anything (MultiViewDx blanked the key in code, §A.0).
    """
    if value:
        return value
    return os.environ.get(env) or default


@dataclass
class Usage:
    """Token and request counters summed over a run (thread-safe)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    retries: int = 0
    failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, n in counts.items():
                setattr(self, key, getattr(self, key) + int(n or 0))

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "requests": self.requests,
            "retries": self.retries,
            "failures": self.failures,
        }


@dataclass
class ChatResult:
    """One successful completion."""

    content: str | None
    model: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms``, ``Retry-After`` seconds or HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, when.timestamp() - time.time()) if when else None


class ChatClient:
    """Thread-safe chat-completions client with a concurrency limit, retries and usage accounting.

    Args:
        base_url: API root, e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1``.
        api_key: bearer token (may be empty for local servers).
        model: model name sent with every request.
        timeout: seconds for one request (connect + read).
        max_retries: retries after the first attempt on 429 / 5xx / timeouts / connection errors.
        backoff: first backoff in seconds; doubles per retry, with jitter, capped by ``max_backoff``.
        max_retry_after: longest ``Retry-After`` honoured before giving up on that request.
        max_concurrency: requests in flight at once from this client (per process).
        seed: seed of the jitter generator (reproducible schedules in tests).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        *,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        max_retry_after: float = 600.0,
        max_concurrency: int = 8,
        seed: int | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self.usage = Usage()
        #: how the client waits between retries; tests replace it to record the schedule
        self.sleep: Callable[[float], None] = time.sleep
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=httpx.Timeout(timeout), headers=headers, transport=transport)

    def close(self) -> None:
        self._http.close()

    def _backoff(self, attempt: int) -> float:
        cap = min(self.max_backoff, self.backoff * (2**attempt))
        with self._rng_lock:
            return cap / 2 + self._rng.uniform(0, cap / 2)  # "equal jitter": never zero, never above the cap

    def _post(self, payload: dict[str, Any]) -> httpx.Response:
        with self._slots:
            self.usage.add(requests=1)
            return self._http.post(self.url, json=payload)

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatResult:
        """Send ``messages``; retry transient failures; return the first choice. Raises :class:`ChatAPIError`."""
        payload = {"model": self.model, "messages": messages, **params}
        last = ""
        for attempt in range(self.max_retries + 1):
            wait: float | None = None
            try:
                resp = self._post(payload)
            except httpx.TimeoutException as exc:
                last = f"timed out ({type(exc).__name__})"
            except httpx.TransportError as exc:
                last = f"connection failed ({type(exc).__name__}: {exc})"
            else:
                if resp.status_code == 200:
                    return self._result(resp)
                last = f"HTTP {resp.status_code}: {resp.text[:300]}"
                if resp.status_code not in _RETRY_STATUS:
                    self.usage.add(failures=1)
                    hint = {
                        401: " (check the API key: config `api_key` or OPENAI_API_KEY)",
                        403: " (check the API key: config `api_key` or OPENAI_API_KEY)",
                        404: f" (check `base_url` and that the server serves model {self.model!r})",
                    }.get(resp.status_code, "")
                    error = EndpointError if resp.status_code in _ENDPOINT_STATUS else ChatAPIError
                    raise error(f"{self.url} rejected the request with {last}{hint}")
                wait = _retry_after(resp.headers)
                if wait is not None and wait > self.max_retry_after:
                    self.usage.add(failures=1)
                    raise ChatAPIError(
                        f"{self.url} asked to retry after {wait:.0f} s (> max_retry_after={self.max_retry_after:.0f} s); "
                        f"last error: {last}"
                    )
            if attempt == self.max_retries:
                break
            delay = wait if wait is not None else self._backoff(attempt)
            log.warning("chat request %s; retry %d/%d in %.2f s", last, attempt + 1, self.max_retries, delay)
            self.usage.add(retries=1)
            self.sleep(delay)
        self.usage.add(failures=1)
        raise ChatAPIError(
            f"{self.url}: giving up after {self.max_retries + 1} attempts; last error: {last}. "
            "Raise `max_retries`/`timeout` or lower `max_concurrency` if the server is overloaded."
        )

    def _result(self, resp: httpx.Response) -> ChatResult:
        try:
            body = resp.json()
            choice = body["choices"][0]
            content = choice["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            self.usage.add(failures=1)
            raise ChatAPIError(
                f"{self.url} answered 200 but not in the chat-completions format ({exc!r}): {resp.text[:300]}"
            ) from None
        usage = body.get("usage") or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.usage.add(prompt_tokens=prompt, completion_tokens=completion)
        return ChatResult(
            content, body.get("model") or self.model, choice.get("finish_reason"), prompt, completion
        )
