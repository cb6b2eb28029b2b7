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

from cambrian_core.serve.request import SamplingParams

__all__ = ["DecodeBatch", "LogitsAdjuster", "adjust_logits", "mergeable", "sample_tokens"]


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
    generators: Sequence[torch.Generator | None] | None = None,
) -> list[int]:
    """One token per row of ``logits`` ``[B, V]``: greedy where the temperature is <= 1e-3, else sampled from
    the temperature-scaled distribution cut to its top-p nucleus. ``banned[i]`` are ids row ``i`` may not take
    yet (end tokens before ``min_tokens``); ``generators[i]`` is row ``i``'s own random stream (else
    ``generator``)."""
    logits = logits.float()
    if any(banned):
        logits = logits.clone()  # the caller's logits stay as they were
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
        own = generators[i] if generators is not None else None
        out[i] = int(torch.multinomial(probs, 1, generator=own or generator))
    return out


def adjust_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
) -> torch.Tensor:
    """``logits`` ``[B, V]`` with each row's penalties and biases (a new tensor when any applies): HF / vLLM
    ``repetition_penalty`` over the prompt's and answer's ids (a positive logit divided, a negative one
    multiplied), OpenAI's ``frequency_penalty`` x count and ``presence_penalty`` over the answer's ids, and
    ``logit_bias``. Ids outside the vocabulary (image placeholders) are ignored."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    logits = logits.float().clone()
    vocab = logits.shape[-1]
    for i in rows:
        p, row = params[i], logits[i]
        answer = torch.tensor([t for t in answers[i] if 0 <= t < vocab], dtype=torch.long, device=row.device)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(
                sorted({t for t in (*prompts[i], *answers[i]) if 0 <= t < vocab}), dtype=torch.long
            ).to(row.device)
            picked = row[seen]
            row[seen] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and len(answer):
            counts = torch.bincount(answer, minlength=vocab).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        for token, bias in p.logit_bias:
            if token < vocab:
                row[token] += bias
    return logits


class LogitsAdjuster:
    """:func:`adjust_logits` as a transformers logits processor (the per-batch ``generate`` path, whose ids are
    the answers only: the prompts go in as embeddings, so their ids are given here)."""

    def __init__(self, params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]]) -> None:
        self.params, self.prompts = list(params), [list(p) for p in prompts]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return adjust_logits(scores, self.params, self.prompts, input_ids.tolist()).to(scores.dtype)
