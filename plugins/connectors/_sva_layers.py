"""SVA building blocks (reference §B.4): tower windows and the "joint" multi-tower cross-attention layer.

Parameters and their state-dict names are the reference's (``proj_context``, ``proj_in``, ``norm``,
``proj_out.linear_{1,2}``, ``cross_attn.{q,k_<t>,v_<t>}_proj.{0,1}``, ``cross_attn.o_proj``,
``pos_embed_<t>``). Only the arithmetic is rearranged, exactly up to float rounding:

* ``LayerNorm -> Linear`` for k and v is folded into a normalisation without affine (shared by k and v,
  and by every layer for towers without a positional embedding) followed by one Linear whose weight and
  bias absorb the LayerNorm's scale and shift.
* For towers with windows larger than one key (``r > 1``) no per-key K/V is ever formed: the per-head query
  is taken into the key space (``q_h W_k,h``) and the attention-weighted window sum is projected by
  ``W_v,h`` afterwards. That costs O(query cells x C^2) instead of O(keys x C^2), i.e. 576 rows instead of
  9216 for the Cambrian-8B ConvNeXt tower, in every layer and every in-LLM sampler.
* When every query cell starts from the same vector (first layer of a query group), ``proj_in``,
  ``q_proj`` and the query side of the scores are computed once per image and broadcast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LN_EPS", "CrossAttentionLayer", "TowerWindows", "VisionTokenSampler", "make_windows"]

#: epsilon of every LayerNorm in SVA (PyTorch's default, as in the reference)
LN_EPS = 1e-5


@dataclass
class TowerWindows:
    """Projected tower maps rearranged so that query cell ``i`` of a ``side x side`` grid owns row ``i``."""

    side: int  #: query grid side q
    windows: list[torch.Tensor]  #: per tower ``[N_img, q*q, r_t*r_t, C]`` (window rows row-major)
    normed: list[torch.Tensor | None]  #: ``layer_norm`` without affine of ``windows`` where ``r_t == 1``
    mask: torch.Tensor | None  #: ``[N_img, q*q, sum_t r_t^2]`` bool (True = attend); ``None`` = all real


def _window(x: torch.Tensor, side: int) -> torch.Tensor:
    """``[B, s*s, ...]`` row-major grid -> ``[B, q*q, r*r, ...]`` windows (``r = s / q``)."""
    b, n = x.shape[:2]
    rest = x.shape[2:]
    r = math.isqrt(n) // side
    if r == 1:
        return x.reshape(b, side * side, 1, *rest)
    x = x.reshape(b, side, r, side, r, *rest).transpose(2, 3)
    return x.reshape(b, side * side, r * r, *rest)


def make_windows(
    maps: list[torch.Tensor], masks: list[torch.Tensor | None] | None, side: int
) -> TowerWindows:
    """Rearrange projected maps ``[N_img, s_t^2, C]`` (and padding masks ``[N_img, s_t^2]``) into windows.

    Windows that lie entirely in padding are un-masked (as in the reference) so no softmax row is empty.
    """
    wins = [_window(p, side) for p in maps]
    normed = [F.layer_norm(w, w.shape[-1:], eps=LN_EPS) if w.shape[2] == 1 else None for w in wins]
    mask = None
    if masks is not None and any(m is not None for m in masks):
        parts = [
            _window(m, side) if m is not None else torch.ones(w.shape[:3], dtype=torch.bool, device=w.device)
            for m, w in zip(masks, wins, strict=True)
        ]
        mask = torch.cat(parts, dim=-1)
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return TowerWindows(side, wins, normed, mask)


def _fold(proj: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of ``Linear(LayerNorm(x))`` acting on ``layer_norm(x)`` without affine."""
    norm, lin = proj[0], proj[1]
    weight, bias = lin.weight, lin.bias
    if norm.bias is not None:
        shift = (weight * norm.bias).sum(-1)  # elementwise: stays fp32 under autocast
        bias = shift if bias is None else bias + shift
    if norm.weight is not None:
        weight = weight * norm.weight
    return weight, bias


def _cat_bias(bk: torch.Tensor | None, bv: torch.Tensor | None, c: int) -> torch.Tensor | None:
    if bk is None and bv is None:
        return None
    ref = bk if bk is not None else bv
    zeros = ref.new_zeros(c)
    return torch.cat([bk if bk is not None else zeros, bv if bv is not None else zeros])


class MLP(nn.Module):
    """``Linear -> GELU -> Linear`` without biases (the reference's ``proj_out``)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden, bias=False)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class MultiKVCrossAttention(nn.Module):
    """Each query cell attends jointly over its windows of every tower (one softmax over all keys)."""

    def __init__(self, dim: int, num_towers: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.num_towers = num_heads, num_towers
        self.q_proj = nn.Sequential(nn.LayerNorm(dim, eps=LN_EPS), nn.Linear(dim, dim, bias=False))
        for t in range(num_towers):
            for kind in ("k", "v"):
                proj = nn.Sequential(nn.LayerNorm(dim, eps=LN_EPS), nn.Linear(dim, dim, bias=False))
                setattr(self, f"{kind}_proj_{t}", proj)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, z: torch.Tensor, win: TowerWindows, pos: list[torch.Tensor | None]) -> torch.Tensor:
        """``z``: ``[B, n, C]`` with ``n`` = 1 (one query shared by every cell) or ``q*q``; returns ``[B, q*q, C]``."""
        b, n, c = z.shape
        h = self.num_heads
        d = c // h
        cells = win.side * win.side
        q = (self.q_proj(z) * d**-0.5).view(b, n, h, d)
        scores, keep = [], []
        for t in range(self.num_towers):
            wk, bk = _fold(getattr(self, f"k_proj_{t}"))
            wv, bv = _fold(getattr(self, f"v_proj_{t}"))
            if pos[t] is None:
                x = win.normed[t]
                if x is None:
                    x = F.layer_norm(win.windows[t], (c,), eps=LN_EPS)
            else:
                x = F.layer_norm(win.windows[t] + pos[t].to(win.windows[t].dtype), (c,), eps=LN_EPS)
            if x.shape[2] == 1:  # one key per cell: project it directly (k and v in one matmul)
                kv = F.linear(x[:, :, 0], torch.cat([wk, wv]), _cat_bias(bk, bv, c)).view(b, cells, 2, h, d)
                scores.append((q * kv[:, :, 0]).sum(-1, keepdim=True).float())
                keep.append(kv[:, :, 1])
                continue
            # window of r*r keys: bring the query into key space instead of projecting every key
            qk = torch.einsum("bnhd,hdc->bnhc", q, wk.view(h, d, c))
            if n == 1:
                s = torch.einsum("bqrc,bhc->bqhr", x, qk[:, 0])
            else:
                s = torch.einsum("bqrc,bqhc->bqhr", x, qk)
            if bk is not None:
                s = s + torch.einsum("bnhd,hd->bnh", q, bk.view(h, d)).unsqueeze(-1)
            scores.append(s.float())
            keep.append((x, wv, bv))
        logits = torch.cat(scores, dim=-1)  # [B, q*q, h, sum r^2]
        if win.mask is not None:
            logits = logits.masked_fill(~win.mask[:, :, None, :], float("-inf"))
        attn = logits.softmax(dim=-1)
        out = None
        for a, kept in zip(attn.split([s.shape[-1] for s in scores], dim=-1), keep, strict=True):
            if isinstance(kept, torch.Tensor):
                o = a * kept
            else:
                x, wv, bv = kept
                summed = torch.einsum("bqhr,bqrc->bqhc", a.to(x.dtype), x)
                o = torch.einsum("bqhc,hdc->bqhd", summed, wv.view(h, d, c))
                if bv is not None:
                    o = o + a.sum(-1, keepdim=True) * bv.view(h, d)
            out = o if out is None else out + o
        return self.o_proj(out.reshape(b, cells, c).to(z.dtype))


class CrossAttentionLayer(nn.Module):
    """One SVA layer: ``Z = proj_in([X, proj_context(ctx)])``; ``Z += attn(Z)``; ``X += MLP(LN(Z))``.

    Args:
        q_dim: width of the queries ``X`` (C in the connector, the LLM width in the in-LLM samplers).
        dim: SVA hidden size C (also the width of the context and of the projected towers).
        window_sides: window side ``r_t`` of every tower for the query grid this layer serves.
        num_heads: attention heads (must divide ``dim``).
        pos_embed_std: std of the learned window position embeddings (reference: 1.0).
    """

    def __init__(
        self, q_dim: int, dim: int, window_sides: list[int], num_heads: int, pos_embed_std: float = 1.0
    ) -> None:
        super().__init__()
        self.q_dim = q_dim
        self.window_sides = list(window_sides)
        self.proj_context = nn.Linear(dim, dim, bias=False)
        self.proj_in = nn.Linear(q_dim + dim, dim, bias=False)
        self.proj_out = MLP(dim, dim, q_dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.cross_attn = MultiKVCrossAttention(dim, len(window_sides), num_heads)
        for t, r in enumerate(window_sides):
            if r > 1:
                setattr(self, f"pos_embed_{t}", nn.Parameter(torch.randn(r * r, dim) * pos_embed_std))

    def pos_embeds(self) -> list[torch.Tensor | None]:
        """Learned window position embedding of each tower (``None`` where the window is one key)."""
        return [getattr(self, f"pos_embed_{t}", None) for t in range(len(self.window_sides))]

    def forward(self, queries: torch.Tensor, context: torch.Tensor, win: TowerWindows) -> torch.Tensor:
        """``queries`` ``[B, n, q_dim]`` (``n`` = 1 or ``q*q``), ``context`` ``[B, C]`` -> ``[B, q*q, q_dim]``."""
        w = self.proj_in.weight
        ctx = F.linear(self.proj_context(context), w[:, self.q_dim :]).unsqueeze(1)  # once per image
        z = F.linear(queries, w[:, : self.q_dim]) + ctx
        z = z + self.cross_attn(z, win, self.pos_embeds())
        return queries + self.proj_out(self.norm(z))


class VisionTokenSampler(nn.Module):
    """A stack of :class:`CrossAttentionLayer` (the reference's ``VisionTokenSampler``, "joint" type)."""

    def __init__(
        self,
        q_dim: int,
        dim: int,
        window_sides: list[int],
        num_layers: int,
        num_heads: int,
        pos_embed_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            CrossAttentionLayer(q_dim, dim, window_sides, num_heads, pos_embed_std) for _ in range(num_layers)
        )

    def forward(self, queries: torch.Tensor, context: torch.Tensor, win: TowerWindows) -> torch.Tensor:
        for layer in self.layers:
            queries = layer(queries, context, win)
        return queries
