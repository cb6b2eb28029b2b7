"""Packed-sequence attention for CPU / MPS / CUDA without flash-attn: ``cambrian_sdpa``.

Transformers keeps packed samples apart under ``sdpa`` by building a dense block-causal mask over the whole
row and attending every query to every key of the row (the masked blocks are computed, then thrown away).
``cambrian_sdpa`` is PyTorch SDPA that, when the caller passes the segment boundaries (``cu_seq_lens_q``, the
flash-attn varlen keyword transformers already forwards to attention functions), runs causal SDPA on each
segment alone: no mask is built and no cross-sample block is computed. Without segment boundaries it *is*
transformers' ``sdpa`` (same function, same mask), so inference and unpacked training are unchanged.

LLM plugins ask for it with ``attn_implementation="sdpa"`` (see :func:`hf_attn_implementation`).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["VARLEN_ATTENTION", "hf_attn_implementation", "segment_bounds", "varlen_sdpa_forward"]

#: transformers' name of the segment-aware SDPA attention registered here
VARLEN_ATTENTION = "cambrian_sdpa"


def varlen_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with the signature of transformers' attention functions (``[B, H, L, D]`` in, ``[B, L, H, D]``
    out). Segments come from ``cu_seq_lens_q`` over the flattened ``B * L`` positions; each must lie in one row."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    b, h, length, d = query.shape
    q = query.transpose(0, 1).reshape(h, b * length, d)
    k = key.transpose(0, 1).reshape(key.shape[1], b * length, d)
    v = value.transpose(0, 1).reshape(value.shape[1], b * length, value.shape[-1])
    bounds = cu.tolist() if isinstance(cu, torch.Tensor) else list(cu)
    p = dropout if module.training else 0.0
    gqa = k.shape[0] != h
    parts = [
        F.scaled_dot_product_attention(
            q[:, s:e], k[:, s:e], v[:, s:e], dropout_p=p, is_causal=True, scale=scaling, enable_gqa=gqa
        )
        for s, e in itertools.pairwise(bounds)
        if e > s
    ]
    out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # [H, B*L, Dv]
    return out.view(h, b, length, -1).permute(1, 2, 0, 3), None


def segment_bounds(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``cu_seq_lens`` (int32, ``[S + 1]``) over the flattened ``[B, L]`` layout of a packed, right-padded batch.

    A segment starts at each row's first position, at every real token with position 0, and where a row's
    padding begins (the padding tail is one segment of its own, which no real token attends to).
    """
    real = attention_mask.bool()
    start = real & (position_ids == 0)
    start[:, 0] = True
    start[:, 1:] |= ~real[:, 1:] & real[:, :-1]
    idx = torch.nonzero(start.flatten(), as_tuple=True)[0]
    end = torch.tensor([real.numel()], device=idx.device, dtype=idx.dtype)
    return torch.cat([idx, end]).to(torch.int32)


def hf_attn_implementation(name: str) -> str:
    """Transformers' attention name for a config's ``attn_implementation`` (``sdpa`` -> ``cambrian_sdpa``)."""
    return VARLEN_ATTENTION if name == "sdpa" else name


AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_forward)
AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
