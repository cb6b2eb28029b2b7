"""``openai`` generator: captions and QA from any OpenAI-compatible chat-completions endpoint.

Per case: the dataset's versioned prompt template (``cambrian_core/data/prompts``), the case's text and labels as
context, optionally the ``k`` most similar passages of a reference corpus (RAG, §A.10), and every image as a data
URL with its true MIME type. The reply must be JSON matching the template's output schema; an invalid reply is sent
back with the exact validation error, up to ``max_reasks`` times. Transport robustness (concurrency limit,
retries, backoff, ``Retry-After``) and token accounting live in :class:`~.chat_client.ChatClient`.
"""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from typing import Any, ClassVar

from cambrian_core.data.case import Case
from cambrian_core.data.converter import Converter
from cambrian_core.data.generators.base import CaseRejected, Generator
from cambrian_core.data.generators.chat_client import ChatClient, resolve_setting
from cambrian_core.data.generators.structured import (
    OutputError,
    output_schema,
    parse_output,
    schema_instructions,
)
from cambrian_core.data.generators.template import image_prefix
from cambrian_core.data.prompts import PromptTemplate, load_prompt

__all__ = ["GenerationError", "OpenAIGenerator", "case_context", "image_data_url"]

_SENDABLE = {"image/png", "image/jpeg", "image/webp", "image/gif"}
_RESPONSE_FORMATS = ("json_schema", "json_object", "none")


class GenerationError(RuntimeError, CaseRejected):
    """No usable output for a case (invalid replies after every re-ask); the runner records it as a reject."""


def image_data_url(path: str | Path) -> str:
    """``data:<real mime>;base64,...`` for ``path``; formats models do not take (TIFF, DICOM...) become PNG."""
    from cambrian_core.data.medimage import load_image, mime_type, to_png_bytes

    data = Path(path).read_bytes()
    mime = mime_type(data)
    if mime not in _SENDABLE:
        data, mime = to_png_bytes(load_image(path)), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _label(key: str) -> str:
    return key.replace("_", " ").strip().capitalize()


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def case_context(case: Case) -> str:
    """The case's free text and structured labels as labelled lines (the prompt's ``{context}``)."""
    lines = [f"{_label(k)}: {' '.join(str(v).split())}" for k, v in case.text.items() if str(v).strip()]
    labels = [
        f"{_label(k)}: {_value(v)}"
        for k, v in case.labels.items()
        if not k.startswith("_") and v not in (None, "", [], {})
    ]
    if labels:
        lines += ["Structured labels:", *(f"- {x}" for x in labels)]
    views = [ref.view for ref in case.images]
    if len(case.images) > 1 and any(views):
        lines.append(
            "Images in order: " + "; ".join(f"{i + 1}: {v or 'unnamed'}" for i, v in enumerate(views))
        )
    return "\n".join(lines) or "(no text or labels for this case)"


def _image_field(images: list[Path]) -> str | list[str]:
    paths = [Path(p).as_posix() for p in images]
    return paths[0] if len(paths) == 1 else paths


def _conversation(prefix: str, pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    conv = []
    for i, (q, a) in enumerate(pairs):
        conv += [{"from": "human", "value": (prefix if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return conv


def _caption_question(n_images: int) -> str:
    return (
        "Describe the findings in this image." if n_images == 1 else "Describe the findings in these images."
    )


class OpenAIGenerator(Generator):
    """Caption / QA generation through an OpenAI-compatible ``/chat/completions`` API.

    Args:
        model: model name sent to the server.
        base_url / api_key: from the config, else ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` (an empty variable
            never overrides a configured value); ``base_url`` defaults to ``https://api.openai.com/v1``.
        prompt: template name (default: the converter's ``prompt_name``); prompt_version: ``"v1"``... (default
            newest).
        max_concurrency: requests in flight at once per process; the conversion runner also generates this many
            cases at once in each process (threads), so ``--workers N`` sends up to ``N x max_concurrency``.
        max_tokens / temperature: sampling settings for each call.
        response_format: ``"json_schema"`` (structured output), ``"json_object"`` (JSON mode) or ``"none"`` (schema
            only described in the prompt).
        max_reasks: how often an invalid reply is sent back with its validation error before the case is rejected.
        timeout / max_retries / backoff / max_backoff / seed: transport, see
            :class:`~.chat_client.ChatClient`.
        native_captions: also emit the source's own caption (``converter.caption``) as a stage-1 record.
        retrieval: ``{"corpus": folder, "k": 3, "index_dir": ..., "model": ..., "min_score": ...}`` enables RAG.
        image_detail: the ``detail`` hint of image parts (``auto``, ``low``, ``high``).
    """

    name: ClassVar[str] = "openai"

    def __init__(
        self,
        model: str = "gpt-4o",
        base_url: str | None = None,
        api_key: str | None = None,
        prompt: str | None = None,
        prompt_version: str | None = None,
        max_tokens: int = 2000,
        temperature: float = 0.2,
        response_format: str = "json_schema",
        max_reasks: int = 2,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        max_concurrency: int = 8,
        seed: int | None = None,
        native_captions: bool = True,
        retrieval: dict[str, Any] | None = None,
        image_detail: str = "auto",
    ) -> None:
        if response_format not in _RESPONSE_FORMATS:
            raise ValueError(f"response_format must be one of {_RESPONSE_FORMATS}, got {response_format!r}")
        if max_reasks < 0:
            raise ValueError(f"max_reasks must be >= 0, got {max_reasks}")
        self.model = model
        self.base_url = resolve_setting(base_url, "OPENAI_BASE_URL", "https://api.openai.com/v1")
        self.api_key = resolve_setting(api_key, "OPENAI_API_KEY")
        self.prompt = prompt
        self.prompt_version = prompt_version or "latest"
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.response_format = response_format
        self.max_reasks = max_reasks
        self.concurrency = max_concurrency  # the runner keeps this many cases in flight per process
        self.native_captions = native_captions
        self.image_detail = image_detail
        self._client_args = dict(
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            max_concurrency=max_concurrency,
            seed=seed,
        )
        self.retrieval = dict(retrieval) if retrieval else None
        if self.retrieval is not None and "corpus" not in self.retrieval:
            raise ValueError("retrieval needs a `corpus` folder, e.g. retrieval=dict(corpus='refs/', k=3)")
        self._lock = threading.Lock()
        self._index_lock = threading.Lock()
        self._client: ChatClient | None = None
        self._index: Any = None
        self._templates: dict[str, PromptTemplate] = {}
        if self.retrieval is not None:
            self._retriever()  # build or load the index now, once, before any worker starts

    # -- lazily built parts (not pickled, so the generator can move to worker processes) ------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_client=None, _lock=None, _index_lock=None, _index=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._index_lock = threading.Lock()

    @property
    def client(self) -> ChatClient:
        with self._lock:
            if self._client is None:
                self._client = ChatClient(self.base_url, self.api_key, self.model, **self._client_args)
            return self._client

    def _retriever(self) -> Any:
        with self._index_lock:
            return self._load_index()

    def _load_index(self) -> Any:
        if self._index is None:
            from cambrian_core.data.retrieval import RetrievalIndex

            cfg = self.retrieval or {}
            self._index = RetrievalIndex(
                cfg["corpus"],
                index_dir=cfg.get("index_dir"),
                model=cfg.get("model"),
                embedder=cfg.get("embedder"),
            )
        return self._index

    def template(self, converter: Converter) -> PromptTemplate:
        """The prompt template used for ``converter``'s cases."""
        name = self.prompt or getattr(converter, "prompt_name", "generic")
        with self._lock:
            if name not in self._templates:
                version = None if self.prompt_version == "latest" else self.prompt_version
                self._templates[name] = load_prompt(name, version)
            # one run = one converter = one template: the runner stamps this tag into every record's provenance
            self.prompt_version = self._templates[name].tag
            return self._templates[name]

    def stats(self) -> dict[str, Any]:
        """Token and request counts of this run (for the run summary)."""
        usage = self._client.usage.as_dict() if self._client else {}
        return {"model": self.model, "base_url": self.base_url, **usage}

    # -- generation -----------------------------------------------------------------------------------------------
    def _references(self, context: str) -> tuple[str, list[dict[str, Any]]]:
        if self.retrieval is None:
            return "", []
        cfg = self.retrieval
        query = " ".join(context.split()[:256])
        hits = self._retriever().search(query, k=int(cfg.get("k", 3)), min_score=cfg.get("min_score"))
        if not hits:
            return "", []
        block = ["Relevant medical guidelines and reference cases (use them only where they fit this case):"]
        block += [f"[{i + 1}] {h.passage.text}" for i, h in enumerate(hits)]
        return "\n".join(block), [h.provenance() for h in hits]

    def messages(
        self, template: PromptTemplate, case: Case, images: list[Path], references: str
    ) -> list[dict[str, Any]]:
        """The chat messages for one case (system + one user turn with text and images)."""
        fmt = schema_instructions(template.output, template.min_pairs, template.max_pairs)
        system = f"{template.system}\n\n{fmt}".strip()
        text = template.render(case_context(case), references, n_images=len(images))
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        for i, path in enumerate(images):
            view = case.images[i].view if i < len(case.images) else None
            if len(images) > 1:
                content.append(
                    {"type": "text", "text": f"Image {i + 1}" + (f" ({view})" if view else "") + ":"}
                )
            url = {"url": image_data_url(path), "detail": self.image_detail}
            content.append({"type": "image_url", "image_url": url})
        return [{"role": "system", "content": system}, {"role": "user", "content": content}]

    def _request_params(self, template: PromptTemplate) -> dict[str, Any]:
        params: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.response_format == "json_object":
            params["response_format"] = {"type": "json_object"}
        elif self.response_format == "json_schema":
            schema = output_schema(template.output, template.min_pairs, template.max_pairs, bounds=False)
            params["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": f"medical_{template.output}", "schema": schema, "strict": True},
            }
        return params

    def ask(
        self, template: PromptTemplate, messages: list[dict[str, Any]]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Call the model until its reply validates; returns ``(parsed, call info)``. Raises GenerationError."""
        params = self._request_params(template)
        messages = list(messages)
        info = {"model": self.model, "attempts": 0, "prompt_tokens": 0, "completion_tokens": 0}
        error = ""
        for _ in range(self.max_reasks + 1):
            result = self.client.chat(messages, **params)
            info["attempts"] += 1
            info["model"] = result.model
            info["prompt_tokens"] += result.prompt_tokens
            info["completion_tokens"] += result.completion_tokens
            try:
                if result.finish_reason == "length":
                    raise OutputError(
                        f"the reply was cut off at max_tokens={self.max_tokens}; answer more briefly"
                    )
                return parse_output(
                    result.content, template.output, template.min_pairs, template.max_pairs
                ), info
            except OutputError as exc:
                error = str(exc)
            fmt = schema_instructions(template.output, template.min_pairs, template.max_pairs)
            messages += [
                {"role": "assistant", "content": result.content or ""},
                {"role": "user", "content": f"That reply cannot be used: {error}. {fmt}"},
            ]
        raise GenerationError(
            f"model {self.model} gave no valid {template.output} JSON after {info['attempts']} attempt(s) "
            f"(prompt {template.tag}); last problem: {error}"
        )

    def generate(self, converter: Converter, case: Case, images: list[Path]) -> list[dict]:
        template = self.template(converter)
        references, retrieved = self._references(case_context(case))
        parsed, info = self.ask(template, self.messages(template, case, images, references))
        n = len(images)
        image = _image_field(images)
        prov: dict[str, Any] = {"origin": "model", "prompt_version": template.tag, "model": info["model"]}
        if retrieved:
            prov["retrieved"] = retrieved
        out: list[tuple[str, list[tuple[str, str]], dict[str, Any]]] = []
        native = converter.caption(case) if self.native_captions else None
        if native:
            out.append(("caption", [(_caption_question(n), native)], {"origin": "source"}))
        if "caption" in parsed:
            out.append(("caption", [(_caption_question(n), parsed["caption"])], dict(prov)))
        if parsed.get("qa"):
            out.append(("instruct", parsed["qa"], dict(prov)))
        # the API cost of the case is carried once, on its first model-made record, so summing `usage` over a
        # records file gives the run's total
        first_model = next(p for _, _, p in out if p["origin"] == "model")
        first_model["usage"] = {k: info[k] for k in ("attempts", "prompt_tokens", "completion_tokens")}
        return [
            {
                "image": image,
                "conversations": _conversation(image_prefix(case, n), pairs),
                "stage": stage,
                "provenance": p,
            }
            for stage, pairs, p in out
        ]
