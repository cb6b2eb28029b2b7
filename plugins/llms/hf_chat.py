"""``hf_chat``: the LLM tokenizer's own Jinja chat template, with exact train/mask segments.

The tokenizer renders the text (``apply_chat_template``). Segments come from prefix renders: for every
assistant turn ``i`` the conversation up to ``i`` with the generation prompt must be a prefix of the
conversation including turn ``i``, which must be a prefix of the whole rendering. What turn ``i`` adds is the
reply (trains) followed by the special token that closes it (trains) and any separator (masked). A chat
template that is not prefix-stable this way (e.g. one that rewrites earlier turns) is refused with a clear
error instead of being masked approximately.
"""

from __future__ import annotations

from typing import Any

from cambrian_core.model.template import ChatTemplate, Message, Segment

__all__ = ["HFChatTemplate", "register"]

_PROBE_USER = "Probe question?"
_PROBE_REPLY = "Probe reply."


class HFChatTemplate(ChatTemplate):
    """Render with the tokenizer's chat template.

    Args:
        tokenizer: the LLM's tokenizer (the LLM passes it when its ``template`` is ``"hf_chat"``).
        system: system prompt to insert when the conversation has none; ``None`` leaves the choice to the
            chat template (which may insert its own default).
        chat_template: a Jinja template to use instead of the tokenizer's.
    """

    name = "hf_chat"

    def __init__(
        self, tokenizer: Any = None, system: str | None = None, chat_template: str | None = None
    ) -> None:
        if tokenizer is None:
            raise ValueError(
                "`hf_chat` renders with the LLM tokenizer's chat template: select it through the LLM's "
                "`template='hf_chat'` (the LLM passes its tokenizer)"
            )
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise ValueError(
                "the tokenizer has no chat template, so `hf_chat` cannot be used; choose a named template "
                "(llama_3, vicuna_v1, chatml_direct, plain) with the LLM's `template=`"
            )
        self.system = system
        head = self._text([{"role": "user", "content": _PROBE_USER}], True)
        done = self._text(
            [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}], False
        )
        if not done.startswith(head):
            raise ValueError(
                "the chat template is not prefix-stable: its generation prompt is not how it renders an "
                f"assistant turn ({head[-40:]!r} vs {done[len(head) - 40 : len(head)]!r}); use a named template"
            )
        self.end_marker = self._end_marker(done[len(head) :])
        bos = getattr(tokenizer, "bos_token", None)
        #: the rendered text carries BOS itself when the chat template writes it
        self.add_bos = not (bos and head.startswith(bos))

    def _text(self, conv: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            out = self.tokenizer.apply_chat_template(
                conv,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as exc:  # jinja2 TemplateError from raise_exception(), missing variables ...
            raise ValueError(f"the chat template refused the conversation: {exc}") from exc
        if not isinstance(out, str):
            raise ValueError(f"apply_chat_template returned {type(out).__name__}, expected text")
        return out

    def _end_marker(self, turn: str) -> str:
        """The special token that closes an assistant reply in ``turn`` (the text one reply adds)."""
        pos = turn.find(_PROBE_REPLY)
        if pos < 0:
            raise ValueError(
                "the chat template does not render the assistant reply verbatim; use a named template"
            )
        after = turn[pos + len(_PROBE_REPLY) :].lstrip()
        specials = set(getattr(self.tokenizer, "all_special_tokens", []) or [])
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        specials |= {t.content for t in decoder.values() if getattr(t, "special", False)}
        hits = sorted((s for s in specials if s and after.startswith(s)), key=len, reverse=True)
        if not hits:
            raise ValueError(
                "the chat template does not close an assistant reply with a special token (the model could not "
                f"learn to stop; text after the reply: {after[:40]!r}); use a named template"
            )
        return hits[0]

    def _conversation(self, messages: list[Message]) -> list[dict[str, str]]:
        conv = [{"role": m.role, "content": m.content} for m in messages]
        if self.system is not None and (not conv or conv[0]["role"] != "system"):
            conv.insert(0, {"role": "system", "content": self.system})
        return conv

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> list[Segment]:
        conv = self._conversation(messages)
        full = self._text(conv, add_generation_prompt)
        segments: list[Segment] = []
        cursor = 0
        for i, turn in enumerate(conv):
            if turn["role"] != "assistant":
                continue
            head = self._text(conv[:i], True)
            done = self._text(conv[: i + 1], False)
            if not (done.startswith(head) and full.startswith(done)):
                raise ValueError(
                    f"the chat template is not prefix-stable at turn {i} (rendering later turns changes earlier "
                    "text), so exact masking is impossible; use a named template"
                )
            added = done[len(head) :]
            reply = turn["content"]
            pos = added.find(reply)
            if pos < 0 and reply.strip():
                reply = reply.strip()
                pos = added.find(reply)
            if pos < 0 or not reply:
                raise ValueError(f"the chat template did not render assistant turn {i} verbatim")
            end = added.find(self.end_marker, pos + len(reply))
            if end < 0 or added[pos + len(reply) : end].strip():
                raise ValueError(
                    f"assistant turn {i} is not closed by {self.end_marker!r} right after the reply"
                )
            stop = end + len(self.end_marker)
            if len(head) + pos > cursor:
                segments.append(Segment(full[cursor : len(head) + pos], train=False))
            segments.append(Segment(added[pos:stop], train=True))
            cursor = len(head) + stop
        if cursor < len(full):
            segments.append(Segment(full[cursor:], train=False))
        return segments

    @property
    def stop_strings(self) -> list[str]:
        eos = getattr(self.tokenizer, "eos_token", None)
        return [self.end_marker] + ([eos] if eos and eos != self.end_marker else [])


def register(registries: Any) -> None:
    registries.templates.register_module(name=HFChatTemplate.name, module=HFChatTemplate)
