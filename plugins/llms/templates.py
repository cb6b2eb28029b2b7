"""The Cambrian chat templates: ``llama_3``, ``vicuna_v1``, ``chatml_direct`` and ``plain``.

Each renders a conversation as segments: an assistant reply plus the token that ends it trains, everything
else (system prompt, user turns, role headers, separators) is masked. The assistant header that precedes a
reply is exactly the generation prompt, so training and inference see the same tokens.

By default each template follows its LLM's official format. ``cambrian1_compat=True`` reproduces what
Cambrian-1 rendered, for loading its released checkpoints:

* every template: each message's ``<image>`` markers are removed and put back at the start of that message,
  one ``<image>\\n`` per image, and the rest of the message is stripped; the Cambrian system prompt is the
  default;
* ``llama_3``: no ``\\n\\n`` after ``<|end_header_id|>``, message content not trimmed, and BOS twice (the text
  starts with ``<|begin_of_text|>`` and the tokenizer adds its own); with an empty system prompt the text
  carries no ``<|begin_of_text|>`` (as upstream), so BOS appears once;
* ``vicuna_v1``: the system prompt is followed by a space even when it is empty;
* ``chatml_direct``: no ``\\n`` after ``<|im_end|>``.

What is *not* reproduced: upstream's token-count masking fudges and its "tokenization mismatch" fallback
(masking here is exact by construction), and, for ``chatml_direct`` with an empty system prompt, upstream's
stray leading ``<|im_end|>`` (the system block is simply left out).
"""

from __future__ import annotations

from typing import Any

from cambrian_core.model.template import IMAGE_TOKEN, ChatTemplate, Message, Segment
from cambrian_core.model.tokenize import MaskingError

__all__ = [
    "CAMBRIAN_SYSTEM",
    "CAMBRIAN_SYSTEM_LLAMA3",
    "VICUNA_SYSTEM",
    "CambrianTemplate",
    "ChatMLTemplate",
    "Llama3Template",
    "PlainTemplate",
    "VicunaTemplate",
    "register",
]

#: Cambrian-1's system prompt for ``llama_3``, with its embedded newlines and indentation
CAMBRIAN_SYSTEM_LLAMA3 = (
    "You are Cambrian, a highly intelligent multimodal AI trained by NYU Vision X. \n"
    "    As a multimodal AI, you have the ability to process and analyze images. Whenever an image is present "
    "in the conversation, very carefully examine it and consider its content when formulating your response.\n"
    "    You should give concise responses to very simple questions, but provide thorough responses to more "
    "complex and open-ended questions. "
)
#: Cambrian-1's system prompt for ``chatml_direct`` (one line)
CAMBRIAN_SYSTEM = (
    "You are Cambrian, a highly intelligent multimodal AI trained by NYU Vision X. As a multimodal AI, you have "
    "the ability to process and analyze images. Whenever an image is present in the conversation, very carefully "
    "examine it and consider its content when formulating your response. You should give concise responses to "
    "very simple questions, but provide thorough responses to more complex and open-ended questions."
)
#: Vicuna v1.1's system prompt (used by Cambrian-1 and LLaVA unchanged)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class _Builder:
    """Collects segments, merging neighbours with the same ``train`` flag."""

    def __init__(self) -> None:
        self.parts: list[list[Any]] = []

    def add(self, text: str, train: bool = False) -> None:
        if not text:
            return
        if self.parts and self.parts[-1][1] == train:
            self.parts[-1][0] += text
        else:
            self.parts.append([text, train])

    def segments(self) -> list[Segment]:
        return [Segment(text=t, train=f) for t, f in self.parts]


def images_first(content: str) -> str:
    """Cambrian-1's image placement: every ``<image>`` moved to the start, one ``<image>\\n`` each."""
    n = content.count(IMAGE_TOKEN)
    if not n:
        return content
    return f"{IMAGE_TOKEN}\n" * n + content.replace(IMAGE_TOKEN, "").strip()


class CambrianTemplate(ChatTemplate):
    """Base of the Cambrian templates.

    Args:
        system: system prompt; ``None`` uses the template's default (Cambrian-1's with ``cambrian1_compat``).
            A leading system message in the conversation overrides it.
        cambrian1_compat: reproduce Cambrian-1's rendering (see the module docstring).
    """

    #: default system prompt under ``cambrian1_compat``
    compat_system: str = ""

    def __init__(self, system: str | None = None, cambrian1_compat: bool = False) -> None:
        self.cambrian1_compat = bool(cambrian1_compat)
        if system is None and self.cambrian1_compat:
            system = self.compat_system
        super().__init__(system)

    def _split(self, messages: list[Message]) -> tuple[str, list[Message]]:
        """The system prompt in force and the remaining turns (images moved first under compat)."""
        system = self.system
        if messages and messages[0].role == "system":
            system, messages = messages[0].content, messages[1:]
        if self.cambrian1_compat:
            messages = [Message(m.role, images_first(m.content)) for m in messages]
        return system, list(messages)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(system={self.system!r}, cambrian1_compat={self.cambrian1_compat})"


class Llama3Template(CambrianTemplate):
    """Meta-Llama-3 instruct format: ``<|begin_of_text|>`` once, headers followed by ``\\n\\n``, content trimmed."""

    name = "llama_3"
    compat_system = CAMBRIAN_SYSTEM_LLAMA3
    special_tokens = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def __init__(self, system: str | None = None, cambrian1_compat: bool = False) -> None:
        super().__init__(system, cambrian1_compat)
        # official: the text carries BOS itself; Cambrian-1: the tokenizer adds another one
        self.add_bos = self.cambrian1_compat

    def _header(self, role: str) -> str:
        sep = "" if self.cambrian1_compat else "\n\n"
        return f"<|start_header_id|>{role}<|end_header_id|>{sep}"

    def _content(self, text: str) -> str:
        return text if self.cambrian1_compat else text.strip()

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> list[Segment]:
        system, turns = self._split(messages)
        out = _Builder()
        if not self.cambrian1_compat or system:
            out.add("<|begin_of_text|>")
        if system:
            out.add(self._header("system") + self._content(system) + "<|eot_id|>")
        for m in turns:
            if m.role == "assistant":
                out.add(self._header("assistant"))
                out.add(self._content(m.content) + "<|eot_id|>", train=True)
            else:
                out.add(self._header("user") + self._content(m.content) + "<|eot_id|>")
        if add_generation_prompt:
            out.add(self._header("assistant"))
        return out.segments()

    @property
    def stop_strings(self) -> list[str]:
        return ["<|eot_id|>"]


class VicunaTemplate(CambrianTemplate):
    """Vicuna v1.1: ``SYSTEM USER: ... ASSISTANT: reply</s>USER: ...``."""

    name = "vicuna_v1"
    default_system = VICUNA_SYSTEM
    compat_system = VICUNA_SYSTEM

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> list[Segment]:
        system, turns = self._split(messages)
        out = _Builder()
        if system or self.cambrian1_compat:
            out.add(system + " ")
        for m in turns:
            if m.role == "assistant":
                out.add("ASSISTANT:")
                out.add(" " + m.content + "</s>", train=True)
            else:
                out.add("USER: " + m.content + " ")
        if add_generation_prompt:
            out.add("ASSISTANT:")
        return out.segments()

    @property
    def stop_strings(self) -> list[str]:
        return ["</s>"]


class ChatMLTemplate(CambrianTemplate):
    """ChatML as Nous-Hermes-2-Yi uses it: ``<|im_start|>role\\n...<|im_end|>\\n``."""

    name = "chatml_direct"
    compat_system = CAMBRIAN_SYSTEM
    special_tokens = ("<|im_start|>", "<|im_end|>")

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> list[Segment]:
        system, turns = self._split(messages)
        nl = "" if self.cambrian1_compat else "\n"
        out = _Builder()
        if system:
            out.add(f"<|im_start|>system\n{system}<|im_end|>{nl}")
        for m in turns:
            if m.role == "assistant":
                out.add("<|im_start|>assistant\n")
                out.add(m.content + "<|im_end|>", train=True)
                out.add(nl)
            else:
                out.add(f"<|im_start|>user\n{m.content}<|im_end|>{nl}")
        if add_generation_prompt:
            out.add("<|im_start|>assistant\n")
        return out.segments()

    @property
    def stop_strings(self) -> list[str]:
        return ["<|im_end|>"]


class PlainTemplate(CambrianTemplate):
    """Caption pretraining: the user turn's images, then the caption (trains) and ``\\n``.

    The user turn's text is dropped (as in LLaVA / Cambrian-1); only image-caption pairs are accepted.
    """

    name = "plain"

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> list[Segment]:
        _, turns = self._split(messages)
        expected = 1 if add_generation_prompt else 2
        if len(turns) != expected:
            raise MaskingError(
                f"`plain` renders one image-caption pair (a user turn with the image and an assistant caption); "
                f"got {len(turns)} turns"
            )
        out = _Builder()
        out.add(IMAGE_TOKEN * turns[0].content.count(IMAGE_TOKEN))
        if not add_generation_prompt:
            out.add(turns[1].content + "\n", train=True)
        return out.segments()

    @property
    def stop_strings(self) -> list[str]:
        return ["\n"]


def register(registries: Any) -> None:
    for cls in (Llama3Template, VicunaTemplate, ChatMLTemplate, PlainTemplate):
        registries.templates.register_module(name=cls.name, module=cls)
