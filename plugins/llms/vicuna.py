"""``vicuna``: Vicuna-1.5 (Cambrian-13B's LLM, lmsys/vicuna-13b-v1.5), template ``vicuna_v1``, pad = unk."""

from __future__ import annotations

from typing import Any

from ._tiny_tokenizer import tiny_tokenizer
from .hf_causal_lm import TINY_LLAMA, HFCausalLM

__all__ = ["VicunaLM", "register"]


class VicunaLM(HFCausalLM):
    """A Vicuna-1.5 causal LM (LLaMA-2 tokenizer: BOS added, pad = unk); see ``HFCausalLM``."""

    default_template = "vicuna_v1"

    @classmethod
    def tiny_tokenizer(cls) -> Any:
        return tiny_tokenizer(
            ["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", unk="<unk>", add_bos=True, style="sentencepiece"
        )

    @classmethod
    def setup_pad_token(cls, tokenizer: Any) -> None:
        if tokenizer.pad_token is None:
            if tokenizer.unk_token is None:
                raise ValueError("the Vicuna tokenizer has no unk token to pad with; set a pad token")
            tokenizer.pad_token = tokenizer.unk_token

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"config": dict(TINY_LLAMA)}


def register(registries: Any) -> None:
    registries.llms.register_module(name="vicuna", module=VicunaLM)
