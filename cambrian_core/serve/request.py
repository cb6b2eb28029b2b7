"""What one generation request is: its sampling settings, its state while it runs, its result, and the handle
a client streams it through. Everything per request lives here, never on the model or the engine."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from cambrian_core.serve.errors import RequestError

__all__ = [
    "MAX_NEW_TOKENS_CAP",
    "EngineError",
    "GenerationResult",
    "Request",
    "RequestHandle",
    "SamplingParams",
]

#: longest answer a request may ask for (LLaVA capped at 1024 too)
MAX_NEW_TOKENS_CAP = 4096


class EngineError(RuntimeError):
    """Generation failed inside the engine (the model raised); the request's stream ends with this."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. ``temperature <= 1e-3`` means greedy (LLaVA's rule)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    #: tokens generated before an end token may end the answer (vLLM's ``min_tokens``)
    min_tokens: int = 0
    #: > 1 discourages every token already in the prompt or the answer (HF / vLLM ``repetition_penalty``: a
    #: positive logit is divided by it, a negative one multiplied); 1 = off
    repetition_penalty: float = 1.0
    #: OpenAI's additive penalties over the answer's tokens: ``frequency_penalty`` x count and
    #: ``presence_penalty`` once per token already in the answer; each in [-2, 2]
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    #: ``(token id, bias)`` pairs added to the logits (OpenAI's ``logit_bias``; bias in [-100, 100])
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: a per-request random stream for sampling (the same seed and request give the same answer)
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop, tuple):
            raise RequestError(f"stop must be a string or a list of strings, got {self.stop!r}", param="stop")
        if (
            not isinstance(self.max_new_tokens, int)
            or isinstance(self.max_new_tokens, bool)
            or not (1 <= self.max_new_tokens <= MAX_NEW_TOKENS_CAP)
        ):
            raise RequestError(
                f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS_CAP}, got {self.max_new_tokens!r}",
                param="max_tokens",
            )
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise RequestError(
                f"temperature must be in [0, 2], got {self.temperature!r}", param="temperature"
            )
        if not 0.0 < float(self.top_p) <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}", param="top_p")
        if any(not isinstance(s, str) or not s for s in self.stop) or len(self.stop) > 8:
            raise RequestError("stop must be up to 8 non-empty strings", param="stop")
        if (
            isinstance(self.repetition_penalty, bool)
            or not isinstance(self.repetition_penalty, (int, float))
            or not 0.0 < float(self.repetition_penalty) <= 2.0
        ):
            raise RequestError(
                f"repetition_penalty must be in (0, 2] (1 = off), got {self.repetition_penalty!r}",
                param="repetition_penalty",
            )
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
                raise RequestError(f"{name} must be a number in [-2, 2], got {value!r}", param=name)
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        try:
            bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        except (TypeError, ValueError):
            bias = None
        if bias is None or any(t < 0 or not -100.0 <= b <= 100.0 for t, b in bias):
            raise RequestError(
                'logit_bias must map token ids (>= 0) to biases in [-100, 100], e.g. {"1234": -100}',
                param="logit_bias",
            )
        object.__setattr__(self, "logit_bias", bias)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise RequestError(f"seed must be an integer, got {self.seed!r}", param="seed")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise RequestError(
                f"min_tokens must be an integer in 0..max_tokens ({self.max_new_tokens}), got {self.min_tokens!r}",
                param="min_tokens",
            )

    @property
    def do_sample(self) -> bool:
        return float(self.temperature) > 1e-3

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys decode in one batch (the stop strings and budgets are per request)."""
        logits = (
            float(self.repetition_penalty),
            float(self.frequency_penalty),
            float(self.presence_penalty),
            self.logit_bias,
        )
        if not self.do_sample:
            return (False, 0.0, 1.0, self.min_tokens, *logits)
        return (True, float(self.temperature), float(self.top_p), self.min_tokens, *logits, self.seed)

    @property
    def adjusts_logits(self) -> bool:
        """Whether any penalty or bias changes the logits before sampling."""
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
            or bool(self.logit_bias)
        )


@dataclass(frozen=True)
class GenerationResult:
    """What a finished request produced. ``finish_reason``: ``stop`` | ``length`` | ``cancelled``."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float | None = None
    duration: float = 0.0


class Channel:
    """Thread-to-consumer queue usable from plain threads and from an asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._q: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._loop = loop
        self._event = asyncio.Event() if loop is not None else None
        self._signalled = False

    def put(self, item: tuple[str, Any]) -> None:
        self._q.put(item)
        if self._loop is not None and self._event is not None and not self._signalled:
            self._signalled = True  # one wake-up per burst: the consumer drains everything queued
            with contextlib.suppress(RuntimeError):  # a closed loop: the client is gone
                self._loop.call_soon_threadsafe(self._event.set)

    def get(self, timeout: float | None) -> tuple[str, Any]:
        return self._q.get(timeout=timeout)

    async def aget(self) -> tuple[str, Any]:
        if self._event is None:
            raise RuntimeError("this request was submitted without an event loop; iterate it synchronously")
        while True:
            with contextlib.suppress(queue.Empty):
                return self._q.get_nowait()
            self._signalled = False  # before the re-check: a put from now on schedules a new wake-up
            self._event.clear()
            with contextlib.suppress(queue.Empty):
                return self._q.get_nowait()
            await self._event.wait()


@dataclass(eq=False)
class Request:
    """One request's whole state (owned by the engine thread once submitted)."""

    id: str
    input_ids: list[int]
    images: list[Image.Image]
    params: SamplingParams
    prompt_tokens: int
    max_new_tokens: int
    channel: Channel
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    #: text of ``tokens`` decoded so far (incrementally) and the part of it already streamed
    text: str = ""
    sent: str = ""
    #: incremental detokenisation: ``tokens[prefix_offset:read_offset]`` is context already turned into text
    prefix_offset: int = 0
    read_offset: int = 0
    first_token: float | None = None
    done: bool = False
    #: the request's own random stream (``params.seed``), made on the logits' device at its first token
    generator: Any = None

    def finish(self, text: str, reason: str) -> None:
        if self.done:
            return
        self.done = True
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.channel.put(("delta", text[len(self.sent) :]))
            self.sent = text
        now = time.perf_counter()
        ttft = None if self.first_token is None else self.first_token - self.submitted
        result = GenerationResult(
            self.sent, reason, self.prompt_tokens, len(self.tokens), ttft, now - self.submitted
        )
        self.channel.put(("done", result))

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self.done = True
            self.channel.put(("error", exc))


class RequestHandle:
    """The client's side of a submitted request: iterate text deltas, then read ``result``."""

    def __init__(self, request: Request) -> None:
        self._req = request
        self._result: GenerationResult | None = None

    @property
    def id(self) -> str:
        return self._req.id

    @property
    def prompt_tokens(self) -> int:
        """Positions the prompt takes (text tokens + image tokens)."""
        return self._req.prompt_tokens

    @property
    def result(self) -> GenerationResult:
        """The final result (only after the stream is exhausted, or after ``wait``)."""
        if self._result is None:
            raise RuntimeError("the request has not finished; iterate it or call wait() first")
        return self._result

    def cancel(self) -> None:
        """Stop generating for this request (its stream ends with ``finish_reason="cancelled"``)."""
        self._req.cancelled.set()

    def _handle(self, kind: str, value: Any) -> str | None:
        if kind == "delta":
            return value
        if kind == "done":
            self._result = value
            return None
        raise EngineError(f"generation failed: {type(value).__name__}: {value}") from value

    def __iter__(self) -> Iterator[str]:
        return self.stream()

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        """Text deltas as they are decoded (``timeout``: longest wait for the next one). Leaving the loop early
        (``break``, an exception, Ctrl-C) cancels the request, so the engine stops decoding it."""
        try:
            while self._result is None:
                try:
                    kind, value = self._req.channel.get(timeout)
                except queue.Empty:
                    raise TimeoutError(f"no output for {timeout} s; request {self.id} cancelled") from None
                delta = self._handle(kind, value)
                if delta:
                    yield delta
        finally:
            if self._result is None:
                self.cancel()

    async def astream(self) -> AsyncIterator[str]:
        """Async text deltas (the request must have been submitted with ``loop=``)."""
        try:
            while self._result is None:
                kind, value = await self._req.channel.aget()
                delta = self._handle(kind, value)
                if delta:
                    yield delta
        finally:
            if self._result is None:
                self.cancel()

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """Consume the stream and return the result."""
        for _ in self.stream(timeout):
            pass
        return self.result
