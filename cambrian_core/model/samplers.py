"""Run a connector's in-LLM samplers (reference §B.5) after the scheduled decoder layers.

Forward hooks are installed once on the LLM's decoder layers. They do nothing unless a ``SamplerContext``
is active in the *current* thread/task (a ``ContextVar``), so everything a call needs (the connector
state, where each image's grid tokens sit in each sample) lives in that per-call object and never on the
model: concurrent calls are safe and a later text-only call can never see an earlier call's images.

A sampler runs only on the pass that carries the image tokens (training forward or generation prefill);
decode steps have another sequence length and pass through untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cambrian_core.model.connector import Connector

__all__ = ["SamplerContext", "activate", "apply_sampler", "install_hooks", "recompute_context"]

_ACTIVE: ContextVar[SamplerContext | None] = ContextVar("cambrian_sampler_context", default=None)
_HOOKED = "_cambrian_sampler_hook"


@dataclass
class SamplerContext:
    """Everything one forward needs to apply the in-LLM samplers to its own image blocks."""

    connector: Connector
    schedule: dict[nn.Module, int]  #: decoder layer -> sampler index
    state: Any  #: the connector's ``ConnectorOutput.state``
    grid_mask: torch.Tensor | None  #: [N_img, f*f] True = real cell
    seq_batch: torch.Tensor  #: [M] sample of each grid token present in the sequence
    seq_pos: torch.Tensor  #: [M] its sequence position
    grid_index: torch.Tensor  #: [M] its index in the flattened [N_img * f*f] grid
    n_images: int
    cells: int  #: f*f
    seq_len: int  #: length of the expanded sequence (the pass that carries the images)
    dtype: torch.dtype  #: compute dtype of the connector
    checkpoint: bool = False  #: recompute samplers in backward (gradient checkpointing)
    batch_size: int | None = None  #: rows of the spliced batch (generate may repeat each row k times)


@contextlib.contextmanager
def activate(ctx: SamplerContext | None) -> Iterator[None]:
    """Make ``ctx`` the active sampler context of the current thread for the duration of the block."""
    token = _ACTIVE.set(ctx)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def recompute_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint`` around decoder layers: the recomputation in backward runs
    with the sampler context of the forward it repeats.

    transformers checkpoints a decoder layer's ``__call__``, forward hooks included, and recomputes it in
    backward, after the forward's :func:`activate` block has ended; without this the recomputed layer would
    skip its sampler and save other tensors than the forward did.
    """
    ctx = _ACTIVE.get()
    return contextlib.nullcontext(), (activate(ctx) if ctx is not None else contextlib.nullcontext())


def apply_sampler(hidden: torch.Tensor, ctx: SamplerContext, index: int) -> torch.Tensor:
    """Scatter each image's tokens into its full grid, run sampler ``index``, gather them back."""
    width = hidden.shape[-1]
    values = hidden[ctx.seq_batch, ctx.seq_pos].to(ctx.dtype)
    grid = values.new_zeros(ctx.n_images * ctx.cells, width).index_put((ctx.grid_index,), values)
    out = ctx.connector.llm_sample(index, grid.view(ctx.n_images, ctx.cells, width), ctx.state, ctx.grid_mask)
    refined = out.reshape(ctx.n_images * ctx.cells, width)[ctx.grid_index].to(hidden.dtype)
    return hidden.index_put((ctx.seq_batch, ctx.seq_pos), refined)


def _hook(module: nn.Module, args: Any, output: Any) -> Any:
    ctx = _ACTIVE.get()
    if ctx is None:
        return None
    index = ctx.schedule.get(module)
    if index is None:
        return None
    hidden = output[0] if isinstance(output, tuple) else output
    if hidden.shape[1] != ctx.seq_len:  # a decode step: the image tokens are in the KV cache already
        return None
    rows = hidden.shape[0]
    if ctx.batch_size and rows != ctx.batch_size:
        # generate()'s num_return_sequences / num_beams repeat each prompt row k times (row r*k + j is copy j
        # of prompt r), identical in the prefill: refine copy 0 of each prompt and hand it to all k
        if rows % ctx.batch_size:
            raise RuntimeError(f"sampler: {rows} rows for a batch of {ctx.batch_size} prompts")
        k = rows // ctx.batch_size
        first = hidden.view(ctx.batch_size, k, *hidden.shape[1:])[:, 0]
        new = (
            apply_sampler(first, ctx, index)
            .unsqueeze(1)
            .expand(-1, k, *hidden.shape[1:])
            .reshape(hidden.shape)
        )
    elif ctx.checkpoint and torch.is_grad_enabled():
        new = checkpoint(apply_sampler, hidden, ctx, index, use_reentrant=False)
    else:
        new = apply_sampler(hidden, ctx, index)
    return (new, *output[1:]) if isinstance(output, tuple) else new


def install_hooks(layers: nn.ModuleList) -> None:
    """Attach the (idle unless a context is active) sampler hook to every decoder layer, once."""
    for layer in layers:
        if not getattr(layer, _HOOKED, False):
            layer.register_forward_hook(_hook)
            setattr(layer, _HOOKED, True)
