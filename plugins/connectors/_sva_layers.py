"""SVA building blocks (reference §B.4): tower windows and the "joint" multi-tower cross-attention layer.

Parameters and their state-dict names are the reference's (``proj_context``, ``proj_in``, ``norm``,
``proj_out.linear_{1,2}``, ``cross_attn.{q,k_<t>,v_<t>}_proj.{0,1}``, ``cross_attn.o_proj``,
``pos_embed_<t>``). Only the arithmetic is rearranged, exactly up to float rounding:

* Towers with one key per query cell (window side ``r = 1``) are projected as the reference does (each
  map has as many rows as there are query cells), except for the keys in a group's first layer (below).
* Towers with ``R = r*r > 1`` keys per cell never get per-key K/V. ``k = LN(p + pos) W_k^T`` is linear
  in ``LN(p + pos)``, so the per-head query is taken into the key space (``u = (W_k diag(gamma_k))^T q``)
  and the LayerNorm is applied through the row statistics of ``x = p + pos`` (the rows' mean and mean
  square, computed once per forward and shared by all layers, plus ``p . pos`` per layer); the position
  embedding reaches the scores and values through ``W_k pos`` and ``W_v pos``, so ``p + pos`` is never
  formed. On the value side the attention-weighted rows are summed first and the sum is projected. That
  costs O(query cells x C^2) instead of O(keys x C^2)
  (576 rows instead of 9216 for the Cambrian-8B ConvNeXt tower) in every layer and in-LLM sampler.
* When every query cell starts from the same vector (first layer of a query group), ``proj_in``,
  ``q_proj`` and the query side of the scores are computed once per image and broadcast, and one-key
  towers meet that query in their key space too (``[cells, C] x [C, heads]`` instead of projecting keys).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

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
    mask: torch.Tensor | None  #: ``[N_img, q*q, sum_t r_t^2]`` bool (True = attend); ``None`` = all real
    #: per tower with ``r_t > 1``: (mean, mean square) over channels of every window row, fp32 ``[N_img, q*q, r_t^2]``;
    #: computed once and shared by every layer and in-LLM sampler that reads these windows
    moments: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)


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
    mask = None
    if masks is not None and any(m is not None for m in masks):
        parts = [
            _window(m, side) if m is not None else torch.ones(w.shape[:3], dtype=torch.bool, device=w.device)
            for m, w in zip(masks, wins, strict=True)
        ]
        mask = torch.cat(parts, dim=-1)
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    moments = [_row_moments(w) if w.shape[2] > 1 else None for w in wins]
    return TowerWindows(side, wins, mask, moments)


class _RowMoments(torch.autograd.Function):
    """(mean, mean square) over the last dim in fp32, with a one-pass backward (``a * x + b`` per row)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 for bf16 / fp16 / fp32, fp64 stays
        mean = x.mean(dim=-1, dtype=acc)
        square = torch.linalg.vector_norm(x, dim=-1, dtype=acc).square() / x.shape[-1]
        ctx.save_for_backward(x)
        return mean, square

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, g_mean: torch.Tensor | None, g_square: torch.Tensor | None
    ) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        c = x.shape[-1]
        shape = x.shape[:-1]
        g_mean = x.new_zeros(shape, dtype=torch.float32) if g_mean is None else g_mean
        g_square = x.new_zeros(shape, dtype=torch.float32) if g_square is None else g_square
        # d mean / dx = 1 / C, d square / dx = 2 x / C
        scale = ((2.0 / c) * g_square).unsqueeze(-1).to(x.dtype)
        # multiply then add in place: ~5x faster than a broadcasting addcmul in bf16 on CPU
        return (x * scale).add_((g_mean / c).unsqueeze(-1).to(x.dtype))


def _row_moments(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, mean of squares) over channels of each window row, in fp32.

    A sum and a 2-norm stream the rows once, forward and backward, where ``var_mean``'s Welford kernel is
    ~25x slower on these shapes. The rows are LayerNorm outputs (unit scale, small mean) plus a position
    embedding, so ``E[x^2] - mean^2`` loses nothing in fp32.
    """
    return _RowMoments.apply(w)


def _fold(proj: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of ``Linear(LayerNorm(x))`` acting on ``layer_norm(x)`` without affine."""
    norm, lin = proj[0], proj[1]
    weight, bias = lin.weight, lin.bias
    if norm.bias is not None:
        # in the weight's dtype: low-precision matrix-vector products accumulate in fp32 on CPU and GPU, and the
        # result is rounded to that dtype anyway (an fp32 copy of a bf16 weight would cost a C x C upcast)
        shift = torch.mv(weight, norm.bias.to(weight.dtype))
        bias = shift if bias is None else bias + shift
    if norm.weight is not None:
        weight = weight * norm.weight
    return weight, bias


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
        d = c // self.num_heads
        q = (self.q_proj(z) * d**-0.5).view(b, n, self.num_heads, d)
        scores, values = [], []
        for t in range(self.num_towers):
            k_proj, v_proj = getattr(self, f"k_proj_{t}"), getattr(self, f"v_proj_{t}")
            if win.windows[t].shape[2] == 1:
                s, v = _one_key(q, win.windows[t], k_proj, v_proj)
            else:
                s, v = _window_keys(q, win.windows[t], win.moments[t], k_proj, v_proj, pos[t])
            scores.append(s)
            values.append(v)
        logits = torch.cat(scores, dim=-1)  # [B, q*q, h, sum r^2]
        if win.mask is not None:
            logits = logits.masked_fill(~win.mask[:, :, None, :], float("-inf"))
        attn = logits.softmax(dim=-1).split([s.shape[-1] for s in scores], dim=-1)
        out = None
        for value, a in zip(values, attn, strict=True):
            out = value(a, out)
        return self.o_proj(out.flatten(2).to(z.dtype))


#: adds a tower's attention output ``[B, q*q, h, d]`` for its attention slice to an accumulator (or starts one)
Value = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _one_key(
    q: torch.Tensor, p: torch.Tensor, k_proj: nn.Sequential, v_proj: nn.Sequential
) -> tuple[torch.Tensor, Value]:
    """A tower with one key per cell: V projected directly (as many rows as query cells), K too unless the
    query is shared.

    With one query for every cell (``n = 1``, a group's first layer) the query is taken into the key space
    instead, as for windowed towers: ``q . k = LN0(x) . u + q . b`` with ``u = (W_k diag(gamma_k))^T q``
    per head and ``LN0`` the LayerNorm without affine, so the keys' ``[q*q, C] x [C, C]`` GEMM becomes a
    ``[q*q, C] x [C, h]`` one.

    Returns the scores ``[B, q*q, h, 1]`` (fp32) and the function taking the attention slice to the output.
    """
    _, n, h, d = q.shape
    x = p[:, :, 0]  # [B, q*q, C]
    wide = torch.promote_types(q.dtype, torch.float32)
    if n == 1 and x.shape[1] > 1:
        wk, bk = _fold(k_proj)
        u = torch.einsum("bhd,hdc->bch", q[:, 0], wk.view(h, d, -1).to(q.dtype))  # [B, C, h]
        normed = F.layer_norm(x, x.shape[-1:], eps=k_proj[0].eps)
        scores = torch.bmm(normed.to(u.dtype), u)  # [B, q*q, h]
        if bk is not None:
            scores = scores + (q[:, 0] * bk.view(h, d).to(q.dtype)).sum(-1).unsqueeze(1)
        scores = scores.unsqueeze(-1).to(wide)
    else:
        k = k_proj(x).unflatten(-1, (h, d))
        scores = (q * k).sum(-1, keepdim=True).to(wide)
    v = v_proj(x).unflatten(-1, (h, d))

    def value(a: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
        return a * v if acc is None else acc.addcmul_(a, v)

    return scores, value


def _same_dtype(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The operands of a custom batched-GEMM function in one dtype: autocast's (custom functions are not
    autocast), else the widest."""
    if torch.is_autocast_enabled(xs[0].device.type):
        dtype = torch.get_autocast_dtype(xs[0].device.type)
    else:
        dtype = xs[0].dtype
        for x in xs[1:]:
            dtype = torch.promote_types(dtype, x.dtype)
    return tuple(x.to(dtype) for x in xs)


def _strided_batches_ok(x: torch.Tensor) -> bool:
    """Whether a batched GEMM reads a head-major ``[h, N, C]`` tensor as ``[N, h, C]`` batches (or the reverse)
    without a copy at no loss: measured on CPU for fp32 (MKL; ~40 % less than copy + GEMM), not for bf16
    (oneDNN; the copy is cheaper there) nor on GPUs (not measured)."""
    return x.dtype == torch.float32 and x.device.type == "cpu"


def _bmm_swapped(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``bmm(a, b).transpose(0, 1)`` as a contiguous tensor.

    Eager: the GEMM writes through the transposed view of the result (no copy; bf16 and fp32 on CPU: 20-55 %
    less time than GEMM + copy at the Cambrian-8B windows). Under ``torch.compile`` a GEMM and a copy, which
    inductor fuses better than the functionalised ``out=`` (measured: the ``out=`` form is ~12 % slower there).
    """
    if torch.compiler.is_compiling():
        return torch.bmm(a, b).transpose(0, 1).contiguous()
    out = a.new_empty(a.shape[1], a.shape[0], b.shape[2])
    torch.bmm(a, b, out=out.transpose(0, 1))
    return out


class _KeySpaceScores(torch.autograd.Function):
    """``raw[N, rows, h] = p[N, rows, :] . u[N, h, :]`` with ``u[N, h] = q[h, N] @ W_k[h]`` (the query in key space),
    and ``dot[N, rows] = p[N, rows, :] . pos[row % R]`` (``pos``: ``[R, C]``) for the LayerNorm statistics.

    ``q``: ``[h, N, d]``, ``w``: ``[h, d, C]``, ``p``: ``[N, rows, C]``. Written out so that every batched GEMM,
    forward and backward, reads row-major batches (autograd's own backward of the same ``bmm`` reads ``u``'s
    gradient through strides of ``h*C``, a power of two, 3-4x slower on CPU), and so that ``p``'s gradient is
    formed once: ``g_raw @ u`` plus ``g_dot * pos`` added in place.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        w: torch.Tensor,
        p: torch.Tensor,
        pos: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # [N, h, C]: a strided view where the GEMMs read one at no loss, else written through a transposed view
        u = torch.bmm(q, w).transpose(0, 1) if _strided_batches_ok(q) else _bmm_swapped(q, w)
        ctx.save_for_backward(q, w, p, u, pos)
        r2, c = pos.shape
        # the diagonal of one [rows, C] x [C, R] GEMM: R-fold work, but BLAS speed in every dtype where a
        # per-row dot product is a strided batch of matrix-vector products
        dot = (p.reshape(-1, c) @ pos.t()).view(-1, r2, r2).diagonal(dim1=-2, dim2=-1).reshape(p.shape[:2])
        return torch.bmm(p, u.transpose(1, 2)), dot  # [N, rows, h], [N, rows]

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor, g_dot: torch.Tensor | None):
        q, w, p, u, pos = ctx.saved_tensors
        r2, c = pos.shape
        g = g.contiguous()
        grad_q = grad_w = grad_p = grad_pos = None
        if ctx.needs_input_grad[2]:
            grad_p = torch.bmm(g, u.contiguous())  # u's rows at power-of-two strides are slow as this operand
            if g_dot is not None:
                grad_p.view(-1, r2, c).addcmul_(g_dot.reshape(-1, r2, 1).to(p.dtype), pos)
        if ctx.needs_input_grad[3] and g_dot is not None:  # sum over windows of g_dot * p, per position r
            full = g_dot.new_zeros(g_dot.numel() // r2, r2, r2)
            full.diagonal(dim1=-2, dim2=-1).copy_(g_dot.reshape(-1, r2))
            grad_pos = full.view(-1, r2).to(p.dtype).t() @ p.reshape(-1, c)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_u = _bmm_swapped(g.transpose(1, 2), p)  # [h, N, C]
            if ctx.needs_input_grad[0]:
                grad_q = torch.bmm(grad_u, w.transpose(1, 2))
            if ctx.needs_input_grad[1]:
                grad_w = torch.bmm(q.transpose(1, 2), grad_u)
        return grad_q, grad_w, grad_p, grad_pos


class _WeightedRowsProjected(torch.autograd.Function):
    """``out[h, N] = (sum_r a[N, h, r] p[N, r, :]) @ W[h]``: attention-weighted window rows, projected per head.

    ``a``: ``[N, h, R]``, ``p``: ``[N, R, C]``, ``w``: ``[h, C, d]`` -> ``[h, N, d]``; backward as in
    :class:`_KeySpaceScores` (row-major batches only).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor, p: torch.Tensor, w: torch.Tensor):
        # [h, N, C], as u in _KeySpaceScores
        summed = torch.bmm(a, p).transpose(0, 1) if _strided_batches_ok(a) else _bmm_swapped(a, p)
        ctx.save_for_backward(a, p, w, summed)
        return torch.bmm(summed, w)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor):
        a, p, w, summed = ctx.saved_tensors
        g = g.contiguous()
        # [h, d, C] then transposed: the plain transpose of ``summed`` has a leading dimension of C (slow)
        grad_w = torch.bmm(g.transpose(1, 2), summed).transpose(1, 2) if ctx.needs_input_grad[2] else None
        grad_a = grad_p = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_summed = _bmm_swapped(g, w.transpose(1, 2))  # [N, h, C]
            if ctx.needs_input_grad[0]:
                grad_a = torch.bmm(grad_summed, p.transpose(1, 2))
            if ctx.needs_input_grad[1]:
                grad_p = torch.bmm(a.transpose(1, 2), grad_summed)
        return grad_a, grad_p, grad_w


def _window_keys(
    q: torch.Tensor,
    p: torch.Tensor,
    moments: tuple[torch.Tensor, torch.Tensor],
    k_proj: nn.Sequential,
    v_proj: nn.Sequential,
    pos: torch.Tensor | None,
) -> tuple[torch.Tensor, Value]:
    """A tower with ``R = r*r`` keys per cell, without ever forming its keys, values or ``p + pos``.

    With ``x = p + pos`` (the window rows plus this layer's position embedding) and
    ``LN(x) = (x - mu) / sigma * gamma + beta``, a score is ``(x.u - mu * sum(u)) / sigma + q.b_k`` where
    ``u = (W_k gamma_k)^T q`` lives in the key space. ``x.u = p.u + (W_k pos).q``: the position part is
    taken to the query side, and ``mu``, ``sigma`` come from the rows' shared moments plus ``p.pos``. The
    value side sums the attention-weighted rows of ``p`` first and projects the sum (``pos`` again through
    ``W_v pos``).
    """
    b, n, h, d = q.shape
    _, cells, r2, c = p.shape
    wk, bk = _fold(k_proj)
    wv, bv = _fold(v_proj)
    mu, square = moments  # [B, q*q, R] fp32 (fp64 for fp64 rows), of the rows of p
    wide = mu.dtype  # statistics and score dtype
    # the query in key space against the raw window rows: [B*n, rows, C] x [B*n, C, h] (n = 1: one GEMM)
    qh = q.reshape(b * n, h, d).transpose(0, 1).contiguous()
    pos_p = pos if pos is not None else p.new_zeros(r2, c)
    qh, wkh, pr, pos_p = _same_dtype(qh, wk.view(h, d, c), p.view(b * n, -1, c), pos_p)
    raw, dot = _KeySpaceScores.apply(qh, wkh, pr, pos_p)
    raw = raw.view(b, cells, r2, h).transpose(-1, -2).to(wide)
    if pos is not None:
        pos_f = pos.to(wide)
        mu = mu + pos_f.mean(-1)
        square = square + (2.0 / c) * dot.view(b, cells, r2).to(wide) + pos_f.square().mean(-1)
        # pos . u = (W_k pos) . q, per head: [B, n, h, R]
        pos_k = F.linear(pos.to(q.dtype), wk.to(q.dtype)).view(r2, h, d)
        raw = raw + torch.einsum("bnhd,rhd->bnhr", q, pos_k).to(wide)
    inv = torch.rsqrt((square - mu.square()).clamp(min=0.0) + LN_EPS)  # [B, q*q, R]
    u_sum = torch.einsum("bnhd,hd->bnh", q, wk.sum(-1).view(h, d).to(q.dtype))  # sum_c u, without reading u
    scores = (raw - mu.unsqueeze(2) * u_sum.unsqueeze(-1).to(wide)) * inv.unsqueeze(2)  # [B, q*q, h, R]
    if bk is not None:
        scores = scores + torch.einsum("bnhd,hd->bnh", q, bk.view(h, d).to(q.dtype)).unsqueeze(-1).to(wide)
    wv_t = wv.view(h, d, c).transpose(1, 2)  # [h, C, d]

    def value(a: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
        w = a * inv.unsqueeze(2)  # [B, q*q, h, R]: attention over sigma = weights of the raw window rows
        # the weights (fp32 statistics) go to the rows' dtype: in a bf16 model without autocast (inference)
        # promoting would upcast every window row and run these products in fp32
        wr, pr, wvh = _same_dtype(w.reshape(b * cells, h, r2).to(p.dtype), p.view(b * cells, r2, c), wv_t)
        out = _WeightedRowsProjected.apply(wr, pr, wvh).transpose(0, 1).view(b, cells, h, d)
        shift = (w * mu.unsqueeze(2)).sum(-1, keepdim=True)  # the mu part: [B, q*q, h, 1]
        corr = shift * wv.sum(-1).view(h, d).to(wide).neg()
        if pos is not None:  # sum_r w_r (W_v pos_r), per head
            pos_v = F.linear(pos.to(wv.dtype), wv).view(r2, h, d).to(wide)
            corr = corr + torch.einsum("bnhr,rhd->bnhd", w, pos_v)
        if bv is not None:
            corr = corr.addcmul_(a.sum(-1, keepdim=True), bv.view(h, d).to(wide))
        out = out + corr.to(out.dtype)
        return out if acc is None else acc.add_(out)

    return scores, value


class _TwoPartLinear(torch.autograd.Function):
    """``proj_in([X, c])`` without forming the concatenation: ``X @ W[:, :k]^T + c @ W[:, k:]^T`` with one ``c``
    (``[B, C]``) per image broadcast over its ``n`` rows of ``X`` (``[B, n, k]``).

    The weight's gradient is one tensor whose halves are written by their own GEMMs. (Autograd through
    ``W.split`` gets each half's gradient column-major and concatenates them: 14 vs 7 ms per layer in fp32
    and 4.2 vs 1.6 ms in bf16 at the Cambrian-8B shape.)
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, c: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        k = x.shape[-1]
        ctx.save_for_backward(x, c, w)
        return (x @ w[:, :k].t()).add_((c @ w[:, k:].t()).unsqueeze(1))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor):
        x, c, w = ctx.saved_tensors
        k = x.shape[-1]
        g_rows = g.reshape(-1, g.shape[-1])
        g_img = g.sum(1)  # [B, C]: the context row of each image reaches all its n rows
        grad_x = grad_c = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (g_rows @ w[:, :k]).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_c = g_img @ w[:, k:]
        if ctx.needs_input_grad[2]:
            grad_w = torch.empty_like(w)
            torch.mm(g_rows.t(), x.reshape(-1, k), out=grad_w[:, :k])
            torch.mm(g_img.t(), c, out=grad_w[:, k:])
        return grad_x, grad_c, grad_w


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
        pc = self.proj_context(context)  # [B, C]: once per image
        # compiled: the split, as before (out= GEMMs are functionalised there; see _bmm_swapped)
        if torch.compiler.is_compiling():
            w_query, w_context = self.proj_in.weight.split(
                [self.q_dim, self.proj_in.in_features - self.q_dim], dim=1
            )
            z = F.linear(queries, w_query) + F.linear(pc, w_context).unsqueeze(1)
        else:
            z = _TwoPartLinear.apply(*_same_dtype(queries, pc, self.proj_in.weight))
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
