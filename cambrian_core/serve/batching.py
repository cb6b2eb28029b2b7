"""Continuous (iteration-level) batching: rows join and leave a running decode between steps.

A :class:`DecodeBatch` holds the rows decoding together: one left-padded KV cache, its attention mask and each
row's next position. New requests are prefilled on their own and merged in (the shorter cache is padded on
the left, the mask marks the padding); finished rows are dropped with an index select, and columns that are
padding for every remaining row are trimmed. Nothing here touches the model's state: the cache and masks
belong to the batch, the batch belongs to the engine's thread.

Works with caches made of full-attention layers (transformers' ``DynamicLayer``); other caches (sliding
windows, hybrid / recurrent layers) make :func:`mergeable` false and the engine falls back to one
``generate`` call per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

__all__ = ["DecodeBatch", "mergeable", "sample_tokens"]


def mergeable(cache: Any) -> bool:
    """Whether rows of ``cache`` can be padded, concatenated and selected here (full-attention layers only)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.keys is not None for layer in layers)


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class DecodeBatch:
    """Rows decoding together (see the module docstring). ``rows[i]`` is the caller's object for row ``i``."""

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, L] (0 = padding)
        self.positions: torch.Tensor | None = None  # [B] next position of each row

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: Sequence[Any], cache: Any, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Append prefilled rows (their cache, ``[n, L]`` mask and next positions) to the batch."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions = list(rows), cache, mask, positions
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.rows.extend(rows)

    def keep(self, keep: Sequence[int]) -> None:
        """Keep only rows ``keep`` (indices, in order); trim leading columns that are padding for all of them."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.positions = [], None, None, None
            return
        idx = torch.tensor(list(keep), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        start = int((mask.any(0).cumsum(0) == 0).sum())  # columns before the first real token of any row
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[..., start:, :]
            layer.values = layer.values.index_select(0, idx)[..., start:, :]
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]

    def step_inputs(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next step's (tokens, attention mask with the new column, positions); advances the batch."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        positions = self.positions
        self.positions = positions + 1
        return tokens, self.mask, positions


def sample_tokens(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ps: Sequence[float],
    banned: Sequence[Sequence[int]],
    generator: torch.Generator | None = None,
    penalties: Sequence[float] | None = None,
    seen: Sequence[Sequence[int]] | None = None,
) -> list[int]:
    """One token per row of ``logits`` ``[B, V]``: greedy where the temperature is <= 1e-3, else sampled from
    the temperature-scaled distribution cut to its top-p nucleus. ``banned[i]`` are ids row ``i`` may not take
    yet (end tokens before ``min_tokens``); ``penalties[i]`` (``repetition_penalty``, 1 = off) applies to the
    ids ``seen[i]`` (row ``i``'s prompt and answer so far; ids outside the vocabulary are ignored)."""
    logits = logits.float()
    penalised = [
        (i, p) for i, p in enumerate(penalties or ()) if p != 1.0 and seen is not None and len(seen[i])
    ]
    if any(banned) or penalised:
        logits = logits.clone()  # the caller's logits stay as they were
        vocab = logits.shape[-1]
        for i, p in penalised:
            ids = torch.tensor(sorted({t for t in seen[i] if 0 <= t < vocab}), dtype=torch.long)
            ids = ids.to(logits.device)
            row = logits[i, ids]
            logits[i, ids] = torch.where(row < 0, row * p, row / p)
        for i, ids in enumerate(banned):
            if ids:
                logits[i, list(ids)] = float("-inf")
    out = logits.argmax(dim=-1).tolist()
    for i, (temp, top_p) in enumerate(zip(temperatures, top_ps, strict=True)):
        if temp <= 1e-3:
            continue
        probs = torch.softmax(logits[i] / temp, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > top_p  # keeps the token that crosses top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        out[i] = int(torch.multinomial(probs, 1, generator=generator))
    return out
