"""``llama3``: the Meta-Llama-3-8B family (Cambrian-8B's LLM), template ``llama_3``.

Pad token: ``<|reserved_special_token_0|>`` (id 128002, as Cambrian-1), or ``<|finetune_right_pad_id|>`` for
tokenizers (Llama-3.1) that name one; the tokenizer adds BOS itself, as Meta's does.
"""

from __future__ import annotations

from typing import Any

from ._tiny_tokenizer import tiny_tokenizer
from .hf_causal_lm import TINY_LLAMA, HFCausalLM

__all__ = ["Llama3LM", "register"]

PAD_CANDIDATES = ("<|reserved_special_token_0|>", "<|finetune_right_pad_id|>")


class Llama3LM(HFCausalLM):
    """A Llama-3 causal LM; see ``HFCausalLM`` for the arguments."""

    default_template = "llama_3"

    @classmethod
    def tiny_tokenizer(cls) -> Any:
        specials = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ]
        return tiny_tokenizer(specials, bos="<|begin_of_text|>", eos="<|end_of_text|>", add_bos=True)

    @classmethod
    def setup_pad_token(cls, tokenizer: Any) -> None:
        if tokenizer.pad_token is not None:
            return
        vocab = tokenizer.get_vocab()
        for token in PAD_CANDIDATES:
            if token in vocab:
                tokenizer.pad_token = token
                return
        raise ValueError(f"the Llama-3 tokenizer has no pad token and none of {PAD_CANDIDATES}; set one")

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"config": dict(TINY_LLAMA)}


def register(registries: Any) -> None:
    registries.llms.register_module(name="llama3", module=Llama3LM)
