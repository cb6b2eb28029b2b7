"""``hermes_yi``: Nous-Hermes-2-Yi-34B (Cambrian-34B's LLM), template ``chatml_direct``, pad = unk
(the generic rule).

Yi's tokenizer does not add BOS; ``<|im_start|>`` / ``<|im_end|>`` are single tokens and ``<|im_end|>`` ends
a reply.
"""

from __future__ import annotations

from typing import Any

from ._tiny_tokenizer import tiny_tokenizer
from .hf_causal_lm import TINY_LLAMA, HFCausalLM

__all__ = ["HermesYiLM", "register"]


class HermesYiLM(HFCausalLM):
    """A Nous-Hermes-2-Yi causal LM; see ``HFCausalLM`` for the arguments."""

    default_template = "chatml_direct"

    @classmethod
    def tiny_tokenizer(cls) -> Any:
        specials = ["<unk>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        return tiny_tokenizer(specials, bos="<|startoftext|>", eos="<|im_end|>", unk="<unk>")

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"config": dict(TINY_LLAMA)}


def register(registries: Any) -> None:
    registries.llms.register_module(name="hermes_yi", module=HermesYiLM)
