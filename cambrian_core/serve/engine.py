"""The inference engine: one loaded model, a request queue and one worker thread that batches requests.

Every front end (CLI, LLaVA worker, OpenAI API, demo) submits requests here. A request object carries all of
its own state (token ids, images, sampling settings, the text generated so far, its output channel); the model
is only ever called from the engine's thread, and keeps nothing between calls, so concurrent clients cannot see
each other's images or text (reference §G.4). Requests decode together with continuous batching
(``batching``): a new request is prefilled and joins the running rows at the next step, whatever its sampling
settings; each row stops on its own (end token, stop string, token budget, cancellation) and leaves. Models
whose KV cache cannot be merged fall back to one ``generate`` call per batch of requests with equal settings.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from transformers import LogitsProcessorList

from cambrian_core.model.masks import real_extents
from cambrian_core.model.template import IMAGE_TOKEN
from cambrian_core.model.tokenize import (
    IMAGE_TOKEN_INDEX,
    MaskingError,
    tokenize_conversation,
    tokenizer_adds_bos,
)
from cambrian_core.serve.batching import DecodeBatch, LogitsAdjuster, adjust_logits, mergeable, sample_tokens
from cambrian_core.serve.errors import RequestError
from cambrian_core.serve.request import (
    Channel,
    EngineError,
    GenerationResult,
    Request,
    RequestHandle,
    SamplingParams,
)

__all__ = [
    "EngineError",
    "GenerationResult",
    "InferenceEngine",
    "RequestHandle",
    "SamplingParams",
    "add_image_markers",
]

log = logging.getLogger(__name__)


class _BatchDone(Exception):
    """Raised from the streamer to end ``generate`` once every request of the batch has finished."""


class _Router:
    """A transformers streamer for a whole batch: routes each row's new token to its request."""

    def __init__(self, engine: InferenceEngine, requests: list[Request]) -> None:
        self.engine = engine
        self.requests = requests
        self.stops = [engine.text_stops(r.params) for r in requests]

    def put(self, value: torch.Tensor) -> None:
        if value.dim() != 1:  # transformers first hands over the prompt ids ([B, L], empty with embeddings)
            return
        now = time.perf_counter()
        for row, token in enumerate(value.tolist()):
            self.engine.accept(self.requests[row], token, self.stops[row], now)
        if all(r.done for r in self.requests):
            raise _BatchDone

    def end(self) -> None:
        pass


def _emit(req: Request, stops: Sequence[str]) -> None:
    """Stream the new part of ``req.text``, holding back what may be the start of a stop string."""
    text = req.text
    if stops:
        hits = [i for i in (text.find(s, max(0, len(req.sent) - len(s))) for s in stops) if i >= 0]
        if hits:
            req.finish(text[: min(hits)], "stop")
            return
        hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text = text[: len(text) - hold]
    if len(text) > len(req.sent):
        req.channel.put(("delta", text[len(req.sent) :]))
        req.sent = text


def add_image_markers(text: str, num_images: int) -> str:
    """Put one ``<image>`` line per image in front of ``text`` unless it already has markers."""
    if num_images and IMAGE_TOKEN not in text:
        return "\n".join([IMAGE_TOKEN] * num_images + [text])
    return text


class InferenceEngine:
    """Owns one model; queues, batches and streams generation requests.

    Args:
        model: a composed model (``prepare_images``, ``generate``, ``llm.tokenizer``, ``llm.template``).
        name: the model name clients use.
        max_batch_size: most requests decoded together (rows join a running decode between steps).
        max_queue: most requests waiting; more are refused with HTTP 503.
        batch_wait: seconds an idle worker waits for more requests before starting a batch that is not full.
        continuous: continuous batching (default); ``False`` runs one ``generate`` call per batch of requests
            with equal sampling settings, each batch to its end.
        image_limits: see :class:`~cambrian_core.serve.images.ImageLimits` (count checked at submission).
    """

    def __init__(
        self,
        model: Any,
        name: str = "cambrian",
        max_batch_size: int = 8,
        max_queue: int = 256,
        batch_wait: float = 0.002,
        max_images: int = 8,
        continuous: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self.max_images = max_images
        self.tokenizer = model.llm.tokenizer
        self.template = model.llm.template
        self._tok_lock = threading.Lock()  # HF fast tokenizers are not safe to share between threads
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
            # the Rust decoder gives what tokenizer.decode gives, without its per-call Python overhead
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self._decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        self.stop_token_ids, self._template_text_stops = self._stop_tokens(self.template.stop_strings)
        self.context_length = int(getattr(model.llm.model.config, "max_position_embeddings", 0) or 0) or 2**31
        grid = int(getattr(model, "grid", 0) or 0)
        #: positions one image may take at most (grid rows, each ending with a newline token)
        self.image_tokens = grid * (grid + 1) if grid else int(getattr(model, "image_token_len", 0) or 0)
        self._pending: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._running = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        #: rows join and leave the running decode between steps (see ``batching``); turned off for models
        #: whose KV cache cannot be merged, which then get one ``generate`` call per batch
        self._continuous = continuous and hasattr(model, "prefill") and hasattr(model, "decode_step")
        self.start()

    # ------------------------------------------------------------------ tokens
    def _stop_tokens(self, strings: Sequence[str]) -> tuple[set[int], tuple[str, ...]]:
        """Stop strings that are single special tokens become token ids; the rest stay strings."""
        ids: set[int] = set()
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            ids.add(int(eos))
        gen_eos = getattr(getattr(self.model.llm.model, "generation_config", None), "eos_token_id", None)
        for t in gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]:
            if t is not None:
                ids.add(int(t))
        special = set(getattr(self.tokenizer, "all_special_tokens", [])) | set(
            getattr(self.tokenizer, "get_added_vocab", dict)()
        )
        texts = []
        for s in strings:
            if s in special:
                ids.add(int(self.tokenizer.convert_tokens_to_ids(s)))
            elif s:
                texts.append(s)
        return ids, tuple(texts)

    def text_stops(self, params: SamplingParams) -> tuple[str, ...]:
        """The stop strings matched on decoded text for a request (template's + its own)."""
        return tuple(dict.fromkeys(self._template_text_stops + tuple(params.stop)))

    def accept(self, req: Request, token: int, stops: Sequence[str], now: float | None = None) -> None:
        """Take ``token`` as ``req``'s next one: end it on an end token, a stop string, its budget or its
        cancellation; otherwise stream the new text."""
        if req.done:
            return
        if req.cancelled.is_set():
            req.finish(req.sent, "cancelled")
            return
        if req.first_token is None:
            req.first_token = time.perf_counter() if now is None else now
        req.tokens.append(token)
        if token in self.stop_token_ids:
            req.finish(self.flush(req), "stop")
            return
        self.detokenize(req)
        # before min_tokens no stop string ends the answer either (vLLM): only the end tokens are banned there
        _emit(req, stops if len(req.tokens) >= req.params.min_tokens else ())
        if not req.done and len(req.tokens) >= req.max_new_tokens:
            req.finish(self.flush(req), "length")

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens`` (special tokens dropped), as ``tokenizer.decode`` gives it."""
        with self._tok_lock:
            return self._decode(list(tokens))

    def detokenize(self, req: Request) -> None:
        """Extend ``req.text`` with its newest tokens, decoding only a short window (vLLM's incremental scheme:
        the window starts a few tokens back so word-initial spaces come out as in a full decode)."""
        with self._tok_lock:
            prefix = self._decode(req.tokens[req.prefix_offset : req.read_offset])
            full = self._decode(req.tokens[req.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):  # no unfinished multi-byte character
            req.text += full[len(prefix) :]
            req.prefix_offset, req.read_offset = req.read_offset, len(req.tokens)

    def flush(self, req: Request) -> str:
        """``req.text`` with whatever its last tokens decode to (an unfinished character included)."""
        with self._tok_lock:
            prefix = self._decode(req.tokens[req.prefix_offset : req.read_offset])
            full = self._decode(req.tokens[req.prefix_offset :])
        req.text += full[len(prefix) :]
        req.prefix_offset = req.read_offset = len(req.tokens)
        return req.text

    def count_tokens(self, text: str) -> int:
        with self._tok_lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenize_messages(self, messages: Sequence[Mapping[str, Any]], num_images: int) -> list[int]:
        """A conversation (``role`` / ``content`` with ``<image>`` markers) rendered with the model's template."""
        try:
            with self._tok_lock:
                conv = tokenize_conversation(
                    self.tokenizer, self.template, messages, add_generation_prompt=True, num_images=num_images
                )
        except MaskingError as exc:
            raise RequestError(f"messages: {exc}", param="messages") from None
        return conv.input_ids

    def tokenize_prompt(self, prompt: str, num_images: int) -> list[int]:
        """An already templated prompt (LLaVA workers receive these) with one ``<image>`` per image."""
        parts = prompt.split(IMAGE_TOKEN)
        if len(parts) - 1 != num_images:
            raise RequestError(
                f"the prompt has {len(parts) - 1} {IMAGE_TOKEN} marker(s) but {num_images} image(s) were sent; "
                f"put one {IMAGE_TOKEN} where each image belongs",
                param="prompt",
            )
        with self._tok_lock:
            encoded = self.tokenizer(parts, add_special_tokens=False)["input_ids"]
            bos = self.template.add_bos and tokenizer_adds_bos(self.tokenizer)
        ids: list[int] = [int(self.tokenizer.bos_token_id)] if bos else []
        for k, piece in enumerate(encoded):
            if k:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(int(t) for t in piece)
        return ids

    def prompt_positions(self, input_ids: Sequence[int], images: Sequence[Image.Image] | None = None) -> int:
        """Positions the prompt takes once every image sentinel is expanded: with ``images`` and a model that
        unpads, each image's real rows (plus their newlines); otherwise the full grid per image."""
        n_img = sum(1 for t in input_ids if t == IMAGE_TOKEN_INDEX)
        text = len(input_ids) - n_img
        grid = int(getattr(self.model, "grid", 0) or 0)
        if images is None or not grid or not getattr(self.model, "unpad", False):
            return text + n_img * self.image_tokens
        extents = real_extents(torch.tensor([im.size for im in images], dtype=torch.long), grid).tolist()
        return text + sum((r1 - r0) * (c1 - c0 + 1) for r0, r1, c0, c1 in extents)

    # ------------------------------------------------------------------ submission
    def submit(
        self,
        input_ids: Sequence[int],
        images: Sequence[Image.Image] = (),
        params: SamplingParams | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> RequestHandle:
        """Queue one request; raises :class:`RequestError` for a bad or oversized one (nothing is queued).

        The token budget is cut to what the context has left after the prompt.
        """
        params = params or SamplingParams()
        images = list(images)
        if len(images) > self.max_images:
            raise RequestError(
                f"too many images: {len(images)} were sent but at most {self.max_images} are accepted per request",
                param="images",
                code="too_many_images",
            )
        n_markers = sum(1 for t in input_ids if t == IMAGE_TOKEN_INDEX)
        if n_markers != len(images):
            raise RequestError(f"{n_markers} image marker(s) in the prompt but {len(images)} image(s) sent")
        positions = self.prompt_positions(input_ids, images)
        room = self.context_length - positions
        if room < 1:
            raise RequestError(
                f"the prompt needs {positions} positions ({len(images)} image(s) and the text) "
                f"but the model's context is {self.context_length}; shorten the prompt or send fewer images",
                param="messages",
                code="context_length_exceeded",
            )
        if self._stop.is_set():
            raise RequestError("the engine is shutting down", status=503)
        req = Request(
            id=f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}",
            input_ids=[int(t) for t in input_ids],
            images=images,
            params=params,
            prompt_tokens=positions,
            max_new_tokens=min(params.max_new_tokens, room),
            channel=Channel(loop),
        )
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise RequestError(
                    f"the server is busy ({len(self._pending)} requests queued); retry later", status=503
                )
            self._pending.append(req)
            self._cond.notify()
        return RequestHandle(req)

    def submit_chat(
        self,
        messages: Sequence[Mapping[str, Any]] | str,
        images: Sequence[Image.Image] = (),
        params: SamplingParams | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> RequestHandle:
        """Template and queue a conversation (or one prompt string; markers are added for its images)."""
        images = list(images)
        if isinstance(messages, str):
            messages = [{"role": "user", "content": add_image_markers(messages, len(images))}]
        if len(images) > self.max_images:  # before tokenising a huge request
            raise RequestError(
                f"too many images: {len(images)} were sent but at most {self.max_images} are accepted per request",
                param="images",
                code="too_many_images",
            )
        return self.submit(self.tokenize_messages(messages, len(images)), images, params, loop)

    def generate(
        self, messages: Sequence[Mapping[str, Any]] | str, images: Sequence[Image.Image] = (), **params: Any
    ) -> GenerationResult:
        """Blocking convenience: answer ``messages`` about ``images``."""
        return self.submit_chat(messages, images, SamplingParams(**params)).wait()

    @property
    def queue_length(self) -> int:
        """Requests waiting plus requests being decoded."""
        with self._cond:
            return len(self._pending) + self._running

    # ------------------------------------------------------------------ worker thread
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=f"engine:{self.name}", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Finish the running batch, fail the queued requests, stop the thread."""
        self._stop.set()
        with self._cond:
            pending = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for req in pending:
            req.fail(EngineError("the engine shut down before this request ran"))
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _take(self, active: int) -> list[Request]:
        """Queued requests that fit next to ``active`` running rows; waits for one when nothing runs."""
        with self._cond:
            if not active:
                while not self._pending and not self._stop.is_set():
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return []
                if (
                    self.max_batch_size > 1
                    and len(self._pending) < self.max_batch_size
                    and self.batch_wait > 0
                ):
                    self._cond.wait(self.batch_wait)
            take: list[Request] = []
            if self._continuous:
                while self._pending and active + len(take) < self.max_batch_size and not self._stop.is_set():
                    take.append(self._pending.popleft())
            elif self._pending and not self._stop.is_set():  # one generate() per batch of equal settings
                first = self._pending.popleft()
                take, key, keep = [first], first.params.batch_key(), collections.deque()
                while self._pending and len(take) < self.max_batch_size:
                    req = self._pending.popleft()
                    (take if req.params.batch_key() == key else keep).append(req)
                keep.extend(self._pending)
                self._pending = keep
            self._running = active + len(take)
            return take

    def _loop(self) -> None:
        batch = DecodeBatch()
        while not (self._stop.is_set() and not batch):
            new = self._take(len(batch))
            live = []
            for req in new:
                if req.cancelled.is_set():
                    req.finish("", "cancelled")
                else:
                    live.append(req)
            try:
                with torch.inference_mode():
                    if live and not self._continuous:
                        self._run_batch(live)
                    elif live:
                        self._admit(batch, live)
                    if batch:
                        self._step(batch)
            except Exception as exc:  # the thread must outlive any one batch: fail what it held, go on
                log.exception("the engine failed a batch of %d request(s)", len(batch.rows) + len(live))
                for r in [*batch.rows, *live]:
                    r.fail(exc)
                batch.keep([])
            finally:
                with self._cond:
                    self._running = len(batch)

    def _prompts(self, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
        """Left-padded ids and mask, pixels and sizes of ``reqs`` on the model's device."""
        device = self._device()
        images = [im for r in reqs for im in r.images]
        pixels, sizes = self.model.prepare_images(images) if images else (None, None)
        if pixels is not None:
            pixels = [p.to(device) for p in pixels]
            sizes = sizes.to(device) if sizes is not None else None
        width = max(len(r.input_ids) for r in reqs)
        pad = int(self.tokenizer.pad_token_id)
        ids = torch.full((len(reqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding
            ids[i, width - len(r.input_ids) :] = torch.tensor(r.input_ids, dtype=torch.long)
            mask[i, width - len(r.input_ids) :] = 1
        return ids.to(device), mask.to(device), pixels, sizes

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        stops = sorted(self.stop_token_ids)
        for r in reqs:  # a seeded request's own random stream, on the logits' device
            if r.params.seed is not None and r.generator is None:
                r.generator = torch.Generator(device=logits.device).manual_seed(r.params.seed)
        logits = adjust_logits(
            logits, [r.params for r in reqs], [r.input_ids for r in reqs], [r.tokens for r in reqs]
        )
        return sample_tokens(
            logits,
            [float(r.params.temperature) if r.params.do_sample else 0.0 for r in reqs],
            [float(r.params.top_p) for r in reqs],
            [stops if len(r.tokens) < min(r.params.min_tokens, r.max_new_tokens) else () for r in reqs],
            generators=[r.generator for r in reqs],
        )

    def _admit(self, batch: DecodeBatch, reqs: list[Request]) -> None:
        """Prefill ``reqs``, take their first tokens and merge them into the running ``batch``."""
        try:
            ids, mask, pixels, sizes = self._prompts(reqs)
            pre = self.model.prefill(ids, mask, pixel_values=pixels, image_sizes=sizes)
        except Exception as exc:
            log.exception("prefill failed for %d request(s)", len(reqs))
            for r in reqs:
                r.fail(exc)
            return
        if not mergeable(pre.cache):  # e.g. sliding-window layers: one generate() per batch from now on
            log.info("the model's KV cache cannot be merged across requests; batching per generate() call")
            self._continuous = False
            self._run_batch(reqs)
            return
        self._take_tokens(pre.logits, reqs)
        batch.add(reqs, pre.cache, pre.attention_mask, pre.positions)
        batch.keep([i for i, r in enumerate(batch.rows) if not r.done])

    def _step(self, batch: DecodeBatch) -> None:
        """One decoding step for every running row."""
        reqs = batch.rows
        try:
            last = torch.tensor([r.tokens[-1] for r in reqs], dtype=torch.long, device=batch.mask.device)
            tokens, mask, positions = batch.step_inputs(last)
            logits = self.model.decode_step(tokens, batch.cache, mask, positions)
        except Exception as exc:
            log.exception("decoding failed for %d request(s)", len(reqs))
            for r in reqs:
                r.fail(exc)
            batch.keep([])
            return
        self._take_tokens(logits, reqs)
        batch.keep([i for i, r in enumerate(reqs) if not r.done])

    def _take_tokens(self, logits: torch.Tensor, reqs: list[Request]) -> None:
        """Sample each row's next token and hand it to its request. A row whose logits hold NaN (an fp16
        overflow, say) fails alone; any other error fails the rows that are still running."""
        try:
            nan = torch.isnan(logits).any(dim=-1).tolist()
            tokens = self._sample(torch.nan_to_num(logits, nan=0.0) if any(nan) else logits, reqs)
            now = time.perf_counter()
            for req, token, broken in zip(reqs, tokens, nan, strict=True):
                if broken:
                    req.fail(
                        EngineError(
                            "the model's next-token logits are NaN (a numerical overflow; float16 is the usual "
                            "cause: serve with --dtype bfloat16 or float32)"
                        )
                    )
                else:
                    self.accept(req, token, self.text_stops(req.params), now)
        except Exception as exc:
            log.exception("sampling failed for %d request(s)", len(reqs))
            for r in reqs:
                r.fail(exc)

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _run_batch(self, batch: list[Request]) -> None:
        try:
            ids, mask, pixels, sizes = self._prompts(batch)
            params = batch[0].params  # one batch_key: the same sampling settings for every row
            budget = max(r.max_new_tokens for r in batch)
            extra: dict[str, Any] = {}
            if params.adjusts_logits:  # penalties over each row's prompt ids too (generate sees embeddings)
                extra["logits_processor"] = LogitsProcessorList(
                    [LogitsAdjuster([r.params for r in batch], [r.input_ids for r in batch])]
                )
            # a seeded batch draws from its seed, then leaves the global stream as it was; others advance it
            seeded = (
                torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else [])
                if params.seed is not None
                else contextlib.nullcontext()
            )
            with torch.inference_mode(), seeded:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                self.model.generate(
                    ids,
                    mask,
                    pixel_values=pixels,
                    image_sizes=sizes,
                    max_new_tokens=budget,
                    do_sample=params.do_sample,
                    temperature=float(params.temperature) if params.do_sample else 1.0,
                    top_p=float(params.top_p) if params.do_sample else 1.0,
                    eos_token_id=sorted(self.stop_token_ids),
                    min_new_tokens=min(params.min_tokens, budget) or None,
                    streamer=_Router(self, batch),
                    **extra,
                )
        except _BatchDone:
            pass
        except Exception as exc:
            log.exception("generation failed for %d request(s)", len(batch))
            for r in batch:
                r.fail(exc)
            return
        for r in batch:  # generate stopped by its own budget / end tokens
            if not r.done:
                r.finish(self.flush(r), "length" if len(r.tokens) >= r.max_new_tokens else "stop")
