"""The chat-template contract: a conversation rendered as text segments that do or do not train.

Rendering returns segments instead of one string so that target masking is exact by construction: each
segment is tokenised on its own and its ``train`` flag becomes the label mask (no after-the-fact
"tokenisation mismatch" guessing as in LLaVA / Cambrian-1). Inference renders through the same code path.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["IMAGE_TOKEN", "ChatTemplate", "Message", "Segment"]

IMAGE_TOKEN = "<image>"

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    """One conversation turn. ``content`` may contain ``<image>`` markers (one per image)."""

    role: Role
    content: str


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text; ``train=True`` marks assistant output that carries loss."""

    text: str
    train: bool = False


class ChatTemplate(abc.ABC):
    """Base class of every chat template (registered in ``TEMPLATES``).

    Args:
        system: system prompt; ``None`` uses the template's default.
    """

    name: str = ""
    #: whether the tokenizer must add BOS itself (False when the rendered text already contains it)
    add_bos: bool = True
    #: markers the rendered text uses that the LLM's tokenizer must hold as single (special) tokens
    special_tokens: tuple[str, ...] = ()
    default_system: str = ""

    def __init__(self, system: str | None = None) -> None:
        self.system = self.default_system if system is None else system

    @abc.abstractmethod
    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> list[Segment]:
        """Segments of the whole conversation; with ``add_generation_prompt`` it ends with the assistant header."""

    @property
    @abc.abstractmethod
    def stop_strings(self) -> list[str]:
        """Strings that end an assistant turn (generation stops on them)."""

    def token_problems(self, tokenizer: Any) -> list[str]:
        """The :attr:`special_tokens` that ``tokenizer`` splits into several pieces (it was trained with another
        template, so its prompts and stops would be plain text), as ``"'<|eot_id|>' -> 7 pieces"``."""
        out = []
        for marker in self.special_tokens:
            ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                out.append(f"{marker!r} -> {len(ids)} pieces")
        return out

    def render_text(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The rendered conversation as one string."""
        return "".join(s.text for s in self.render(messages, add_generation_prompt))
