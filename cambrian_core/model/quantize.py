"""The LLM's linear layers in 8 or 4 bits through bitsandbytes (serving with ``--load-8bit`` / ``--load-4bit``,
training with ``lora.qlora=True``).

Only the decoder's ``nn.Linear`` layers are swapped (the LM head, the embeddings, the vision towers and the
connector keep their dtype, as LLaVA's ``llm_int8_skip_modules`` does for its projector). The weights are
quantized when the module moves to its device (bitsandbytes quantizes ``Int8Params`` / ``Params4bit`` on
``.to()``), so call :func:`quantize_linears` on the CPU copy, then move the model. bitsandbytes >= 0.48 runs
both formats on CUDA and on the CPU.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

__all__ = ["QUANT_BITS", "MissingPackageError", "quantize_linears", "require_bitsandbytes"]

#: what ``bits`` may be: 8 (LLM.int8 with outlier threshold 6.0) or 4 (NF4)
QUANT_BITS = (8, 4)


class MissingPackageError(ImportError):
    """An optional package a requested feature needs is not installed (the message says how to install it)."""


def require_bitsandbytes(what: str) -> Any:
    """Import bitsandbytes, or raise :class:`MissingPackageError` naming ``what`` needed it and how to install it."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise MissingPackageError(
            f"{what} needs bitsandbytes: pip install 'cambrian[quant]' (or pip install bitsandbytes)"
        ) from exc
    return bnb


def quantize_linears(
    module: nn.Module,
    bits: Literal[8, 4],
    compute_dtype: torch.dtype,
    skip: tuple[str, ...] = ("lm_head",),
    what: str = "quantizing the LLM",
) -> int:
    """Replace every ``nn.Linear`` under ``module`` whose name does not end with one of ``skip`` by a
    bitsandbytes layer holding the same weights (quantized at the next ``.to(device)``); returns how many.

    ``bits=8``: ``Linear8bitLt`` (int8 weights, fp16/bf16 outliers above 6.0); ``bits=4``: ``Linear4bit``
    with NF4 weights computing in ``compute_dtype``. The new layers do not train (QLoRA adds adapters).
    """
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits!r}")
    bnb = require_bitsandbytes(what)
    count = 0
    for name, parent in list(module.named_modules()):
        for attr, sub in list(parent.named_children()):
            full = f"{name}.{attr}" if name else attr
            if type(sub) is not nn.Linear or full.endswith(skip):
                continue
            weight = sub.weight.data.to("cpu", compute_dtype if bits == 4 else sub.weight.dtype)
            if bits == 8:
                q = bnb.nn.Linear8bitLt(
                    sub.in_features,
                    sub.out_features,
                    bias=sub.bias is not None,
                    has_fp16_weights=False,
                    threshold=6.0,
                )
                q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                q = bnb.nn.Linear4bit(
                    sub.in_features,
                    sub.out_features,
                    bias=sub.bias is not None,
                    compute_dtype=compute_dtype,
                    quant_type="nf4",
                )
                q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            if sub.bias is not None:
                q.bias = nn.Parameter(sub.bias.data.detach().clone().cpu(), requires_grad=False)
            setattr(parent, attr, q)
            count += 1
    return count
