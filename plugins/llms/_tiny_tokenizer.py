"""Small BPE tokenizers built in memory, for the LLMs' tiny (offline, file-free) forms.

Byte-level BPE (and SentencePiece-style BPE on ASCII) round-trips the text, so tests can decode the trainable
ids of a conversation and compare them with the expected strings. Each LLM family gives its own special tokens and BOS policy, so the
tiny form behaves like the real tokenizer where masking depends on it (BOS added or not, pad token).
"""

from __future__ import annotations

import functools
import string
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["tiny_tokenizer"]

_CORPUS = (
    "The chest X-ray shows no acute cardiopulmonary abnormality.",
    "What is shown in this image? Describe the findings.",
    "There is a small left pleural effusion and mild cardiomegaly.",
    "The lungs are clear. Heart size is normal. No pneumothorax.",
    "Axial CT of the abdomen demonstrates a hypodense liver lesion.",
    "Is there a fracture? No, the bones are intact.",
    "USER: ASSISTANT: user assistant system answer the question",
)


@functools.lru_cache(maxsize=16)
def _tokenizer_json(special_tokens: tuple[str, ...], vocab_size: int, style: str, unk: str | None) -> str:
    if style == "sentencepiece":  # LLaMA-2's: words start with "▁", one added at the start of the text only
        tok = Tokenizer(models.BPE(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set(string.printable) | {"▁"})
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(
    special_tokens: Sequence[str],
    *,
    bos: str | None = None,
    eos: str | None = None,
    unk: str | None = None,
    pad: str | None = None,
    add_bos: bool = False,
    chat_template: str | None = None,
    vocab_size: int = 384,
    style: str = "byte_level",
) -> PreTrainedTokenizerFast:
    """A fresh BPE tokenizer whose first ids are ``special_tokens`` (in order).

    Args:
        bos, eos, unk, pad: which of ``special_tokens`` play these roles.
        add_bos: put BOS in front when asked for special tokens (as LLaMA tokenizers do).
        chat_template: a Jinja chat template to attach.
        style: ``byte_level`` (GPT-2 / LLaMA-3 / SmolLM2: spaces belong to the next word, any byte round-trips)
            or ``sentencepiece`` (LLaMA-2 / Vicuna: a "▁" word-start marker, one prepended to the text; printable
            ASCII round-trips, other characters are ``unk``).
    """
    if style not in ("byte_level", "sentencepiece"):
        raise ValueError(f"style must be byte_level or sentencepiece, got {style!r}")
    for role, token in (("bos", bos), ("eos", eos), ("unk", unk), ("pad", pad)):
        if token is not None and token not in special_tokens:
            raise ValueError(
                f"{role} token {token!r} is not one of the special tokens {list(special_tokens)}"
            )
    tok = Tokenizer.from_str(_tokenizer_json(tuple(special_tokens), vocab_size, style, unk))
    if add_bos:
        if bos is None:
            raise ValueError("add_bos=True needs a bos token")
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast
