"""The Gradio chat UI shared by the one-process demo and the controller-backed web server.

The UI takes one image file at a time (PNG, JPEG, DICOM or NIfTI), shows it as the model will see it after
windowing, and attaches it to the next question; later images attach to later turns, so a conversation may hold
several. Answers stream into the chat. What generates the answers is a :class:`ChatBackend`: the demo's is the
in-process engine, the web server's is a controller and its workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gradio as gr
from PIL import Image

from cambrian_core.data.windowing import PRESETS
from cambrian_core.model.template import IMAGE_TOKEN
from cambrian_core.serve.errors import RequestError
from cambrian_core.serve.images import ScanOptions, image_from_file

__all__ = ["WINDOW_CHOICES", "Attachment", "BackendError", "ChatBackend", "build_blocks", "render_scan"]

log = logging.getLogger(__name__)

WINDOW_CHOICES = ["auto", *PRESETS, "minmax", "percentile"]
AXIS_CHOICES = ["axial", "coronal", "sagittal"]
#: longest question accepted from the UI (LLaVA: 1536 characters)
MAX_QUESTION_CHARS = 4096


class BackendError(RuntimeError):
    """The backend could not answer; the message is shown in the chat."""


class ChatBackend(Protocol):
    """Where the UI's answers come from."""

    def models(self) -> list[str]:
        """Model names the user can pick from."""
        ...

    def stream(
        self, model: str, messages: list[dict[str, str]], images: list[Image.Image], params: dict[str, Any]
    ) -> Iterator[str]:
        """Text deltas of the answer; raises :class:`BackendError` (or ``RequestError``) when it cannot."""
        ...


@dataclass(frozen=True)
class Attachment:
    """An image attached to user turn ``turn`` (0-based over user turns) with its display options."""

    turn: int
    path: str
    window: str
    axis: str


def _file_path(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    return (
        getattr(value, "path", None)
        or getattr(value, "name", None)
        or (value.get("path") if isinstance(value, dict) else None)
    )


def render_scan(path: str | None, window: str = "auto", axis: str = "axial") -> Image.Image | None:
    """The image as the model sees it (windowed, middle slice of a volume); ``None`` without a file."""
    if not path:
        return None
    options = ScanOptions(window=None if window in (None, "", "auto") else window, slice_axis=axis or None)
    return image_from_file(path, f"the file {Path(path).name!r}", options=options)


def _text_of(content: Any) -> str:
    """The text of a chat message's content (a string, a part dict, or a list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(_text_of(c) for c in content)
    return str(content)


def conversation(history: list[dict[str, Any]], attachments: list[Attachment]) -> list[dict[str, str]]:
    """Chat history (Gradio messages) -> model messages with one ``<image>`` per attachment at its turn."""
    out, turn = [], 0
    for m in history:
        text = _text_of(m.get("content"))
        if m.get("role") == "user":
            markers = [IMAGE_TOKEN] * sum(1 for a in attachments if a.turn == turn)
            text = "\n".join([*markers, text])
            turn += 1
        out.append({"role": m.get("role"), "content": text})
    return out


def build_blocks(
    backend: ChatBackend,
    title: str = "cambrian",
    reload_models: bool = True,
) -> Any:
    """The Gradio app. Its API (for ``gradio_client``): ``/render`` (file, window, axis) -> image and ``/chat``
    (question, history, file, window, axis, temperature, top_p, max tokens, model) -> (history, "").

    A page opened with ``?model=<name>`` preselects that model.
    """
    models = backend.models()

    def render(file: Any, window: str, axis: str) -> Image.Image | None:
        try:
            return render_scan(_file_path(file), window, axis)
        except RequestError as exc:
            raise gr.Error(exc.message) from None

    def chat(
        question: str,
        history: list[dict[str, Any]] | None,
        file: Any,
        window: str,
        axis: str,
        temperature: float,
        top_p: float,
        max_tokens: int,
        model: str,
        attachments: list[Attachment] | None,
    ) -> Iterator[tuple[list[dict[str, Any]], str, list[Attachment]]]:
        history = list(history or [])
        attachments = list(attachments or [])
        question = (question or "").strip()
        if not question:
            raise gr.Error("type a question first")
        if len(question) > MAX_QUESTION_CHARS:
            raise gr.Error(f"the question is over {MAX_QUESTION_CHARS} characters")
        if IMAGE_TOKEN in question:
            raise gr.Error(f"{IMAGE_TOKEN} is reserved; attach images with the file box")
        path = _file_path(file)
        turn = sum(1 for m in history if m.get("role") == "user")
        last = attachments[-1] if attachments else None
        if path and (last is None or (last.path, last.window, last.axis) != (path, window, axis)):
            attachments.append(Attachment(turn, path, window, axis))
        history = [*history, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        try:
            images = [render_scan(a.path, a.window, a.axis) for a in attachments]
            params = {
                "temperature": float(temperature),
                "top_p": float(top_p),
                "max_new_tokens": int(max_tokens),
            }
            answer = ""
            for delta in backend.stream(
                model or (models[0] if models else ""),
                conversation(history[:-1], attachments),
                images,
                params,
            ):
                answer += delta
                history[-1] = {"role": "assistant", "content": answer + "▌"}
                yield history, "", attachments
            history[-1] = {"role": "assistant", "content": answer}
        except (BackendError, RequestError) as exc:
            history[-1] = {"role": "assistant", "content": f"⚠️ {exc}"}
        yield history, "", attachments

    def on_load(request: gr.Request) -> Any:
        names = backend.models() if reload_models else models
        wanted = dict(request.query_params).get("model") if request is not None else None
        return gr.update(choices=names, value=wanted if wanted in names else (names[0] if names else None))

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\nUpload a PNG, JPEG, DICOM or NIfTI image, pick a window, and ask about it.")
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(models, value=models[0] if models else None, label="Model")
                scan = gr.File(label="Image (PNG / JPEG / DICOM / NIfTI)", type="filepath", elem_id="scan")
                with gr.Row():
                    window = gr.Dropdown(WINDOW_CHOICES, value="auto", label="Window")
                    axis = gr.Dropdown(AXIS_CHOICES, value="axial", label="Slice (volumes)")
                preview = gr.Image(
                    label="What the model sees",
                    type="pil",
                    format="png",
                    interactive=False,
                    height=320,
                    elem_id="preview",
                )
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0.0, 1.0, value=0.2, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.7, step=0.05, label="Top p")
                    max_tokens = gr.Slider(1, 1024, value=256, step=1, label="Max output tokens")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", height=520)
                question = gr.Textbox(label="Question", placeholder="Ask about the image and press Enter")
                with gr.Row():
                    send = gr.Button("Send", variant="primary")
                    clear = gr.Button("Clear")
        attachments = gr.State([])
        scan.change(render, [scan, window, axis], [preview], api_name="render")
        for control in (window, axis):
            control.change(render, [scan, window, axis], [preview], api_name=False)
        inputs = [question, chatbot, scan, window, axis, temperature, top_p, max_tokens, model, attachments]
        outputs = [chatbot, question, attachments]
        send.click(chat, inputs, outputs, api_name="chat")
        question.submit(chat, inputs, outputs, api_name=False)
        clear.click(lambda: ([], "", []), None, outputs, api_name=False)
        demo.load(on_load, None, [model], api_name=False)
    return demo


def launch(demo: Any, host: str, port: int, block: bool = True, concurrency: int = 16) -> Any:
    """Start the app on ``host:port`` (no share link, no analytics, no SSR node server)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo.queue(default_concurrency_limit=concurrency)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        quiet=True,
        prevent_thread_lock=not block,
        ssr_mode=False,
        show_error=True,
    )
