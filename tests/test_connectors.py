"""Connector plugins: every registered connector in tiny form, SVA against a plain re-implementation of
reference §B.4/§B.5, and the configuration errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from cambrian_plugins.connectors.mlp import projector_config
from cambrian_plugins.connectors.sva import SVAConnector
from torch.utils._python_dispatch import TorchDispatchMode

from cambrian_core import CONNECTORS, build
from cambrian_core.model.connector import Connector, ConnectorOutput
from cambrian_core.model.encoder import StagedTokens

DEFAULT_DIMS = {"in_channels": [32, 48], "in_token_lens": [16, 64], "out_dim": 64, "token_len": 16}


def tiny(name: str, **overrides) -> Connector:
    cls = CONNECTORS.get(name)
    dims = dict(getattr(cls, "tiny_dims", DEFAULT_DIMS))
    return build(CONNECTORS, {"type": name, **dims, **cls.tiny_config(), **overrides})


def inputs(m: Connector, n_img: int = 2, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    feats = [
        torch.randn(n_img, n, c, generator=g).to(dtype)
        for n, c in zip(m.in_token_lens, m.in_channels, strict=True)
    ]
    masks = [torch.rand(n_img, n, generator=g) > 0.25 for n in m.in_token_lens]
    return feats, masks


def run_all(m: Connector, feats, masks) -> list[torch.Tensor]:
    """Tokens plus the output of every in-LLM sampler (so every parameter is exercised)."""
    out = m(feats, masks)
    outs = [out.tokens]
    for k in range(len(m.sampler_layers)):
        outs.append(m.llm_sample(k, out.tokens, out.state, None))
    return outs


# ----------------------------------------------------------------------------- every registered connector


@pytest.mark.parametrize("name", CONNECTORS.names())
def test_registered_connector_tiny_forward(name):
    torch.manual_seed(0)
    m = tiny(name)
    assert isinstance(m, Connector)
    feats, masks = inputs(m)
    out = m(feats, masks)
    assert isinstance(out, ConnectorOutput)
    assert out.tokens.shape == (2, m.token_len, m.out_dim)
    assert out.tokens.dtype == torch.float32
    assert torch.isfinite(out.tokens).all()
    for k in range(len(m.sampler_layers)):
        refined = m.llm_sample(k, out.tokens, out.state, None)
        assert refined.shape == out.tokens.shape and refined.dtype == out.tokens.dtype
    # the whole module in bf16 gives bf16 tokens
    m16 = m.to(torch.bfloat16)
    feats16 = [f.to(torch.bfloat16) for f in feats]
    outs16 = run_all(m16, feats16, masks)
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o).all() for o in outs16)


@pytest.mark.parametrize("name", CONNECTORS.names())
def test_registered_connector_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    m = tiny(name)
    feats, masks = inputs(m)
    feats = [f.requires_grad_(True) for f in feats]
    outs = run_all(m, feats, masks)
    loss = sum((o * torch.randn_like(o)).sum() for o in outs)
    loss.backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reached {pname}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"
    for f in feats:
        assert f.grad is not None and f.grad.abs().sum() > 0


@pytest.mark.parametrize("name", CONNECTORS.names())
def test_registered_connector_bf16_autocast(name):
    torch.manual_seed(0)
    m = tiny(name)
    feats, masks = inputs(m)
    ref = run_all(m, feats, masks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_all(m, feats, masks)
    for r, g in zip(ref, got, strict=True):
        assert g.shape == r.shape and g.dtype in (torch.bfloat16, torch.float32)
        assert torch.isfinite(g).all()
        scale = r.abs().max().item()
        assert (g.float() - r).abs().max().item() < 0.1 * scale + 0.05


# ----------------------------------------------------------------------------- plain re-implementation of SVA


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _lin(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def _ref_layer(p, pre, x, ctx, keys, mask, heads):
    """One VisionCrossAttentionLayer for ONE query cell: x [q_dim], ctx [C], keys[t] [r_t^2, C], mask [L]."""
    res = x
    z = _lin(torch.cat([x, _lin(ctx, p[pre + "proj_context.weight"])]), p[pre + "proj_in.weight"])
    ks, vs = [], []
    for t, w in enumerate(keys):
        if w.shape[0] > 1:
            w = w + p[f"{pre}pos_embed_{t}"]
        a = f"{pre}cross_attn.k_proj_{t}."
        ks.append(_lin(_ln(w, p[a + "0.weight"], p[a + "0.bias"]), p[a + "1.weight"]))
        a = f"{pre}cross_attn.v_proj_{t}."
        vs.append(_lin(_ln(w, p[a + "0.weight"], p[a + "0.bias"]), p[a + "1.weight"]))
    k, v = torch.cat(ks), torch.cat(vs)
    a = pre + "cross_attn.q_proj."
    q = _lin(_ln(z, p[a + "0.weight"], p[a + "0.bias"]), p[a + "1.weight"])
    d = q.shape[0] // heads
    s = (k.view(-1, heads, d) * q.view(heads, d)).sum(-1) / math.sqrt(d)  # [keys, heads]
    s = torch.where(mask[:, None], s, torch.tensor(float("-inf"), dtype=s.dtype))
    w = torch.exp(s - s.max(0).values)
    w = w / w.sum(0)  # softmax over the keys, per head
    out = (w[:, :, None] * v.view(-1, heads, d)).sum(0).reshape(-1)
    z = z + _lin(out, p[pre + "cross_attn.o_proj.weight"])
    y = _ln(z, p[pre + "norm.weight"], p[pre + "norm.bias"])
    y = _lin(_gelu(_lin(y, p[pre + "proj_out.linear_1.weight"])), p[pre + "proj_out.linear_2.weight"])
    return res + y


def _ref_cell_windows(maps, masks, b, i, j, q):
    """Tower windows and the joint key mask of cell (i, j) of image b on a q x q grid."""
    keys, ms = [], []
    for t, pm in enumerate(maps):
        s = math.isqrt(pm.shape[1])
        r = s // q
        grid = pm[b].view(s, s, -1)
        keys.append(grid[i * r : (i + 1) * r, j * r : (j + 1) * r].reshape(r * r, -1))
        m = masks[t][b].view(s, s) if masks[t] is not None else torch.ones(s, s, dtype=torch.bool)
        ms.append(m[i * r : (i + 1) * r, j * r : (j + 1) * r].reshape(-1))
    mask = torch.cat(ms)
    if not mask.any():
        mask = torch.ones_like(mask)
    return keys, mask


def ref_sva(m: SVAConnector, feats, masks, heads, params=None):
    """Reference §B.4 with loops over images, groups, query cells and layers (float64).

    ``params``: float64 tensors by state-dict name to use instead of the model's (to take gradients).
    """
    p = params if params is not None else {k: v.detach().double() for k, v in m.state_dict().items()}
    maps = []
    for t, f in enumerate(feats):
        a = f"mm_projector_aux_{t}."
        x = _gelu(_lin(f.double(), p[a + "0.weight"], p[a + "0.bias"]))
        x = _lin(x, p[a + "2.weight"], p[a + "2.bias"])
        maps.append(_ln(x, p[a + "3.weight"], p[a + "3.bias"]))
    n_img, fside = feats[0].shape[0], math.isqrt(m.token_len)
    groups = []
    for g, qn in enumerate(m.query_sides):
        q = qn
        depth = len(getattr(m, f"vision_sampler_{g}").layers)
        y = torch.zeros(n_img, q * q, m.vision_hidden_size, dtype=torch.float64)
        for b in range(n_img):
            ctx = maps[0][b].mean(0)
            for i in range(q):
                for j in range(q):
                    keys, mask = _ref_cell_windows(maps, masks, b, i, j, q)
                    x = p["vision_query"][g]
                    for li in range(depth):
                        x = _ref_layer(p, f"vision_sampler_{g}.layers.{li}.", x, ctx, keys, mask, heads)
                    y[b, i * q + j] = x
        if q != fside:
            grid = y.transpose(1, 2).reshape(n_img, -1, q, q)
            y = F.interpolate(grid, size=(fside, fside), mode="bilinear", align_corners=False)
            y = y.flatten(2).transpose(1, 2)
        groups.append(y)
    tokens = _lin(
        _gelu(_lin(torch.cat(groups, -1), p["mm_projector.0.weight"], p["mm_projector.0.bias"])),
        p["mm_projector.2.weight"],
        p["mm_projector.2.bias"],
    )
    return tokens, maps, p


def ref_llm_sample(m: SVAConnector, index, hidden, maps, masks, p, heads):
    f = math.isqrt(m.token_len)
    out = hidden.double().clone()
    for b in range(hidden.shape[0]):
        ctx = maps[0][b].mean(0)
        for i in range(f):
            for j in range(f):
                keys, mask = _ref_cell_windows(maps, masks, b, i, j, f)
                pre = f"vision_sampler_layers.{index}.layers.0."
                out[b, i * f + j] = _ref_layer(p, pre, hidden[b, i * f + j].double(), ctx, keys, mask, heads)
    return out


def _ref_masks(n_img=2):
    """Padding masks at each tower's resolution: image 0 has its top quarter padded in every tower (so the
    top row of query cells sees only padding), image 1 random padding."""
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (16, 64, 144):
        s = math.isqrt(n)
        m = torch.ones(n_img, s, s, dtype=torch.bool)
        m[0, : s // 4] = False
        m[1] = torch.rand(s, s, generator=g) > 0.4
        out.append(m.view(n_img, n))
    return out


def _ref_model(**kw) -> SVAConnector:
    torch.manual_seed(0)
    cfg = dict(
        in_channels=[24, 40, 16],
        in_token_lens=[16, 64, 144],
        out_dim=48,
        token_len=16,
        vision_hidden_size=32,
        num_heads=4,
        num_query_group=2,
        query_num_list=[16, 4],  # grids 4x4 (windows 1, 2, 3) and 2x2 (windows 2, 4, 6)
        connector_depth=2,
        connector_only=False,
        num_of_vision_sampler_layers=2,
        start_of_vision_sampler_layers=1,
        stride_of_vision_sampler_layers=2,
    )
    cfg.update(kw)
    m = build(CONNECTORS, {"type": "sva", **cfg})
    with torch.no_grad():  # make the LayerNorm affines non-trivial so folding them is really tested
        for name, prm in m.named_parameters():
            if prm.dim() == 1 and name.endswith(("0.bias", "norm.bias", "3.bias", "0.weight", "norm.weight")):
                prm.add_(0.3 * torch.randn_like(prm))
    return m


def test_sva_equals_plain_reference_loop():
    m = _ref_model()
    feats = [torch.randn(2, n, c) for n, c in zip(m.in_token_lens, m.in_channels, strict=True)]
    masks = _ref_masks()
    out = m(feats, masks)
    want, maps, p = ref_sva(m, feats, masks, heads=4)
    assert torch.isfinite(out.tokens).all()
    torch.testing.assert_close(out.tokens.double(), want, atol=1e-5, rtol=1e-5)
    # the in-LLM samplers against the same loop, on hidden states of the LLM width
    hidden = torch.randn(2, 16, 48)
    for k in range(2):
        got = m.llm_sample(k, hidden, out.state, None)
        torch.testing.assert_close(
            got.double(), ref_llm_sample(m, k, hidden, maps, masks, p, 4), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sva_gradients_equal_the_plain_reference_loop(dtype):
    """Input and parameter gradients (position embeddings, folded LayerNorms, shared moments included)
    match autograd through the loop; fp32 and fp64 take different batched-GEMM layouts."""
    m = _ref_model(connector_only=True).to(dtype)
    feats = [
        torch.randn(2, n, c, dtype=dtype, requires_grad=True)
        for n, c in zip(m.in_token_lens, m.in_channels, strict=True)
    ]
    masks = _ref_masks()
    out = m(feats, masks).tokens
    ref_feats = [f.detach().double().requires_grad_(True) for f in feats]
    params = {k: v.detach().double().requires_grad_(True) for k, v in m.named_parameters()}
    want, _, _ = ref_sva(m, ref_feats, masks, heads=4, params=params)
    g = torch.randn_like(want)
    names = [k for k, v in m.named_parameters() if k in params]
    got = torch.autograd.grad(out, [*feats, *(dict(m.named_parameters())[k] for k in names)], g.to(dtype))
    ref = torch.autograd.grad(want, [*ref_feats, *(params[k] for k in names)], g, allow_unused=True)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert any("pos_embed" in k for k in names)
    for name, a, b in zip([f"feature {t}" for t in range(3)] + names, got, ref, strict=True):
        b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol, msg=lambda e, n=name: f"{n}: {e}")


def test_sva_staged_tower_equals_its_tokens():
    """A tower given as ``StagedTokens`` (shrunk, equal and small stages) gives the tokens, in-LLM sampler outputs
    and gradients (parameters and stage maps) of the same tower given as its concatenated tokens."""
    m = _ref_model().double()
    g = torch.Generator().manual_seed(3)
    feats = [
        torch.randn(2, n, c, generator=g, dtype=torch.float64)
        for n, c in zip([16, 64], [24, 40], strict=True)
    ]
    maps = [  # tower 2: 12x12 grid, 16 channels from stages on 24x24, 12x12, 6x6 and 3x3 grids
        torch.randn(2, c, s, s, generator=g, dtype=torch.float64).requires_grad_(True)
        for c, s in [(3, 24), (5, 12), (6, 6), (2, 3)]
    ]
    masks = _ref_masks()
    hidden = torch.randn(2, 16, 48, generator=g, dtype=torch.float64)
    outs = []
    for staged in (False, True):
        tower = StagedTokens.from_maps(maps, 12)
        out = m([*feats, tower if staged else tower.tokens()], masks)
        samples = [m.llm_sample(k, hidden, out.state, None) for k in range(2)]
        total = out.tokens.square().sum() + sum(s.square().sum() for s in samples)
        grads = torch.autograd.grad(total, [*maps, *m.parameters()])
        outs.append((out.tokens, samples, grads))
    (tok_a, samp_a, grad_a), (tok_b, samp_b, grad_b) = outs
    torch.testing.assert_close(tok_b, tok_a, rtol=1e-10, atol=1e-10)
    for a, b in zip(samp_a, samp_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    for a, b in zip(grad_a, grad_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sva_in_bf16_and_on_cuda_matches_fp64_cpu_with_masks_and_a_staged_tower(device, dtype):
    """On the device (fp64, and fp32 parameters under bf16 autocast, as training runs), SVA with padding masks
    and a staged tower gives the fp64 CPU tokens, sampler outputs and gradients; the staged and the token input
    agree with each other there too."""
    ref = _ref_model().double()
    g = torch.Generator().manual_seed(6)
    feats = [torch.randn(2, n, c, generator=g, dtype=torch.float64) for n, c in [(16, 24), (64, 40)]]
    maps = [
        torch.randn(2, c, s, s, generator=g, dtype=torch.float64)
        for c, s in [(3, 24), (5, 12), (6, 6), (2, 3)]
    ]
    hidden = torch.randn(2, 16, 48, generator=g, dtype=torch.float64)
    masks = _ref_masks()

    def run(m, device, staged, autocast):
        dt = next(m.parameters()).dtype  # fp64, or fp32 master weights under bf16 autocast
        ms = [x.to(device, dt).requires_grad_(True) for x in maps]
        tower = StagedTokens.from_maps(ms, 12)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = m(
                [*(f.to(device, dt) for f in feats), tower if staged else tower.tokens()],
                [x.to(device) for x in masks],
            )
            samples = [m.llm_sample(k, hidden.to(device, dt), out.state, None) for k in range(2)]
        total = out.tokens.double().square().sum() + sum(s.double().square().sum() for s in samples)
        grads = torch.autograd.grad(total, [*ms, *m.parameters()])
        return [t.detach().double().cpu() for t in (out.tokens, *samples, *grads)]

    want = run(ref, torch.device("cpu"), staged=False, autocast=False)
    dev = torch.device(device)
    m = _ref_model().to(dev, torch.float64 if dtype == torch.float64 else torch.float32)
    m.load_state_dict(ref.state_dict())
    bf16 = dtype == torch.bfloat16
    got = {staged: run(m, dev, staged, autocast=bf16) for staged in (True, False)}
    for a, b, c in zip(got[True], got[False], want, strict=True):
        if bf16:  # relative error of the whole tensor: bf16 rounding through two layers reaches ~3 %
            assert (a - c).norm() <= 0.05 * c.norm() and (b - c).norm() <= 0.05 * c.norm()
        else:
            torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_compiled_sva_gives_the_eager_gradients_with_masks_and_a_staged_tower():
    """``SVAConnector.compile`` (padding masks, depth 2, two query groups, in-LLM samplers, a staged tower):
    tokens, sampler outputs and every parameter gradient equal eager's, and new stage values reuse the graphs.
    (Inductor got the gradients of this connector wrong, by up to 15 %, while windows were made in-graph.)"""
    import torch._dynamo.utils

    m = _ref_model()
    g = torch.Generator().manual_seed(4)
    feats = [torch.randn(2, n, c, generator=g) for n, c in zip([16, 64], [24, 40], strict=True)]
    maps = [torch.randn(2, c, s, s, generator=g) for c, s in [(3, 24), (5, 12), (6, 6), (2, 3)]]
    hidden = torch.randn(2, 16, 48, generator=g)
    masks = _ref_masks()
    names = [n for n, _ in m.named_parameters()]
    runs = []
    torch._dynamo.utils.counters.clear()
    for compiled in (False, True):
        if compiled:
            m.compile()
        out = m([*feats, StagedTokens.from_maps(maps, 12)], masks)
        samples = [m.llm_sample(k, hidden, out.state, None) for k in range(2)]
        loss = out.tokens.square().sum() + sum(s.square().sum() for s in samples)
        runs.append((out.tokens, torch.autograd.grad(loss, list(m.parameters()))))
    m([*feats, StagedTokens.from_maps([2 * x for x in maps], 12)], masks)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    assert not torch._dynamo.utils.counters["recompiles"]
    (out_e, grads_e), (out_c, grads_c) = runs
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(names, grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda e, n=name: f"{n}: {e}")


def test_sva_reference_without_masks_and_single_group():
    m = _ref_model(num_query_group=1, query_num_list=None, connector_only=True)
    feats = [torch.randn(1, n, c) for n, c in zip(m.in_token_lens, m.in_channels, strict=True)]
    want, _, _ = ref_sva(m, feats, [None, None, None], heads=4)
    torch.testing.assert_close(m(feats).tokens.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(feats, [None, None, None]).tokens.double(), want, atol=1e-5, rtol=1e-5)


def test_sva_padded_keys_get_zero_attention():
    """Changing features under padding leaves every output unchanged (masked-mean context; every cell has a
    real key in tower 1, so no window falls back to attending padding)."""
    m = _ref_model(global_context="masked_mean")
    g = torch.Generator().manual_seed(5)
    masks = [torch.rand(2, n, generator=g) > 0.5 for n in m.in_token_lens]
    m1 = masks[1].view(2, 4, 2, 4, 2).clone()
    m1[:, :, 0, :, 0] = True  # top-left key of each 2x2 window of tower 1 is real (also in the 2x2 grid)
    masks[1] = m1.reshape(2, 64)
    feats = [torch.randn(2, n, c, generator=g) for n, c in zip(m.in_token_lens, m.in_channels, strict=True)]
    moved = [
        torch.where(mk.unsqueeze(-1), f, 100 * torch.randn_like(f))
        for f, mk in zip(feats, masks, strict=True)
    ]
    a, b = m(feats, masks), m(moved, masks)
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-5, rtol=1e-5)
    hidden = torch.randn(2, 16, 48)
    for k in range(2):
        torch.testing.assert_close(
            m.llm_sample(k, hidden, a.state, None), m.llm_sample(k, hidden, b.state, None)
        )
    # without masks the same change does move the output (the test can fail)
    assert not torch.allclose(m(feats).tokens, m(moved).tokens, atol=1e-3)


def test_sva_all_padding_gives_no_nan():
    m = _ref_model()
    feats = [torch.randn(2, n, c) for n, c in zip(m.in_token_lens, m.in_channels, strict=True)]
    masks = [torch.zeros(2, n, dtype=torch.bool) for n in m.in_token_lens]
    out = m(feats, masks)
    assert torch.isfinite(out.tokens).all()
    # all-padding windows attend to every key, i.e. the same as no mask at all
    torch.testing.assert_close(out.tokens, m(feats).tokens)
    for k in range(2):
        assert torch.isfinite(m.llm_sample(k, out.tokens, out.state, None)).all()
    # masked-mean context of an all-padding image falls back to the plain mean (same seed, same weights)
    masked = _ref_model(global_context="masked_mean")(feats, masks).tokens
    torch.testing.assert_close(masked, out.tokens)


class _Products(TorchDispatchMode):
    """Records (op name, operand dtypes and sizes) of the matrix products and dtype conversions of a call."""

    OPS = ("mm", "addmm", "bmm", "baddbmm", "mv", "_to_copy")

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[torch.dtype, int]], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.OPS:
            operands = [(a.dtype, a.numel()) for a in args if isinstance(a, torch.Tensor)]
            self.calls.append((name, operands, out.dtype))
        return out


def test_sva_bf16_model_keeps_window_rows_in_bf16():
    """A bf16 connector without autocast (inference) multiplies the window rows in bf16: the fp32 attention
    statistics must not promote them (that upcast every row of the windowed towers, in every layer)."""
    torch.manual_seed(0)
    m = tiny("sva").to(torch.bfloat16)
    feats, masks = inputs(m, dtype=torch.bfloat16)
    rows = feats[1].shape[0] * feats[1].shape[1] * m.vision_hidden_size  # the 8x8 tower's window rows
    with torch.no_grad(), _Products() as products:
        run_all(m, feats, masks)
    big = [(name, ops, out) for name, ops, out in products.calls if any(n >= rows for _, n in ops)]
    assert any(name == "bmm" for name, _, _ in big)  # the window rows do go through products
    for name, ops, out in big:
        assert out == torch.bfloat16 and all(dt == torch.bfloat16 for dt, _ in ops), (name, ops, out)


def test_sva_llm_sample_keeps_padding_cells():
    m = _ref_model()
    feats, masks = (
        [torch.randn(2, n, c) for n, c in zip(m.in_token_lens, m.in_channels, strict=True)],
        _ref_masks(),
    )
    out = m(feats, masks)
    grid_mask = torch.rand(2, 16) > 0.5
    hidden = torch.randn(2, 16, 48)
    full = m.llm_sample(0, hidden, out.state, None)
    got = m.llm_sample(0, hidden, out.state, grid_mask)
    assert torch.equal(got[~grid_mask], hidden[~grid_mask])
    assert torch.equal(got[grid_mask], full[grid_mask])
    with pytest.raises(IndexError, match="in-LLM sampler 2 does not exist; there are 2"):
        m.llm_sample(2, hidden, out.state, None)
    with pytest.raises(ValueError, match=r"expects hidden states \[2, 16, 48\]"):
        m.llm_sample(0, hidden[:, :9], out.state, None)


@pytest.mark.parametrize(
    ("layers", "num", "stride", "want"),
    [
        (32, 10, 3, (0, 3, 6, 9, 12, 15, 18, 21, 24, 27)),  # Cambrian-8B
        (40, 10, 4, (0, 4, 8, 12, 16, 20, 24, 28, 32, 36)),  # Cambrian-13B
        (60, 9, 7, (0, 7, 14, 21, 28, 35, 42, 49, 56)),  # Cambrian-34B
    ],
)
def test_sva_sampler_schedule(layers, num, stride, want):
    m = tiny("sva", num_of_vision_sampler_layers=num, stride_of_vision_sampler_layers=stride)
    assert m.sampler_layers == want and max(want) < layers
    assert len(m.vision_sampler_layers) == num
    assert tiny("sva", connector_only=True).sampler_layers == ()
    with pytest.raises(RuntimeError, match="no in-LLM samplers"):
        tiny("sva", connector_only=True).llm_sample(0, torch.zeros(1, 16, 64), None, None)


def test_sva_accepts_cambrian_json_query_list():
    m = tiny("sva", num_query_group=2, query_num_list="[16, 4]")
    assert m.query_sides == [4, 2]
    assert m(*inputs(m)).tokens.shape == (2, 16, 64)


def test_sva_state_dict_names_follow_cambrian():
    m = _ref_model()
    sd = m.state_dict()
    for key, shape in {
        "mm_projector_aux_2.0.weight": (32, 16),
        "mm_projector_aux_2.3.weight": (32,),
        "vision_query": (2, 32),
        "vision_sampler_0.layers.1.cross_attn.k_proj_2.1.weight": (32, 32),
        "vision_sampler_0.layers.0.pos_embed_2": (9, 32),
        "vision_sampler_1.layers.0.pos_embed_0": (4, 32),
        "mm_projector.2.weight": (48, 48),
        "vision_sampler_layers.1.layers.0.proj_in.weight": (32, 48 + 32),
        "vision_sampler_layers.1.layers.0.proj_out.linear_2.weight": (48, 32),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert "vision_sampler_0.layers.0.pos_embed_0" not in sd  # window side 1: no position embedding


def test_mlp_projectors_and_type_strings():
    cfg = projector_config("mlp4x_gelu", in_channels=[8, 8], in_token_lens=[4, 4], out_dim=16, token_len=4)
    assert cfg["type"] == "mlp_gelu" and cfg["depth"] == 4
    m = build(CONNECTORS, cfg)
    assert sum(isinstance(x, torch.nn.Linear) for x in m.mm_projector) == 4
    assert projector_config("sva") == {"type": "sva"}
    m2 = tiny("mlp2x_gelu")
    assert sorted(m2.state_dict()) == [
        "mm_projector.0.bias",
        "mm_projector.0.weight",
        "mm_projector.2.bias",
        "mm_projector.2.weight",
    ]
    feats, _ = inputs(m2)
    want = m2.mm_projector[2](F.gelu(m2.mm_projector[0](torch.cat(feats, -1))))
    torch.testing.assert_close(m2(feats).tokens, want)
    ident = tiny("identity")
    feats, _ = inputs(ident)
    assert torch.equal(ident(feats).tokens, torch.cat(feats, -1))


# ----------------------------------------------------------------------------- configuration errors


def _sva_cfg(**kw):
    cfg = dict(DEFAULT_DIMS, type="sva", vision_hidden_size=32, num_heads=4)
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (_sva_cfg(in_token_lens=[16, 60]), "tower 1 has 60 tokens, which is not a perfect square"),
        (_sva_cfg(token_len=15), "image_token_len 15 is not a perfect square"),
        (
            _sva_cfg(in_token_lens=[16, 36]),
            r"tower 1 has a 6x6 grid \(36 tokens\) that query group 0 \(16 queries\) on a 4x4 grid cannot split "
            r"into windows: window side 6/4 is not an integer",
        ),
        (
            _sva_cfg(in_token_lens=[16, 36], query_num_list=[4], connector_only=False),
            r"tower 1 has a 6x6 grid \(36 tokens\) that the in-LLM samplers' final grid \(16 tokens\) on a 4x4",
        ),
        (_sva_cfg(vision_hidden_size=30), "vision_hidden_size 30 is not divisible by num_heads 4"),
        (
            _sva_cfg(num_query_group=2, query_num_list=[16]),
            "query_num_list has 1 entries but num_query_group is 2",
        ),
        (_sva_cfg(global_context="max"), "global_context must be one of mean, masked_mean"),
        (
            dict(DEFAULT_DIMS, type="mlp2x_gelu"),
            "mlp2x_gelu needs every tower at image_token_len tokens; tower 1 has 64, expected 16 — set "
            "vision_tower_aux_token_len_list",
        ),
        (
            dict(DEFAULT_DIMS, type="linear"),
            "linear needs every tower at image_token_len tokens; tower 1 has 64",
        ),
        (
            dict(DEFAULT_DIMS, type="mlp_gelu", in_token_lens=[16, 16], depth=0),
            "depth must be an integer >= 1",
        ),
        (
            dict(DEFAULT_DIMS, type="identity", in_token_lens=[16, 16]),
            r"identity needs the towers' hidden sizes to add up to the LLM width: 32 \+ 48 = 80 != 64",
        ),
    ],
)
def test_bad_configs_fail_before_weights(cfg, match):
    cls = CONNECTORS.get(cfg["type"])
    problems = cls.check_config({k: v for k, v in cfg.items() if k != "type"})
    assert any(re.search(match, p) for p in problems), problems
    with pytest.raises(ValueError, match=match):
        build(CONNECTORS, cfg)


def test_check_config_without_dims_checks_what_it_can():
    # the composed model fills in the dims later; the options alone can still be wrong
    assert SVAConnector.check_config({"vision_hidden_size": 1024}) == []
    assert any("not divisible" in p for p in SVAConnector.check_config({"vision_hidden_size": 1000}))


def test_forward_rejects_mismatched_inputs():
    m = tiny("sva")
    feats, masks = inputs(m)
    with pytest.raises(
        ValueError, match=r"tower 1 features have shape \(2, 64, 40\), expected \[N_img, 64, 48\]"
    ):
        m([feats[0], feats[1][..., :40]])
    with pytest.raises(ValueError, match="was built for 2 towers but got 1"):
        m(feats[:1])
    with pytest.raises(ValueError, match=r"tower 0 mask has shape \(2, 16\) and dtype torch.float32"):
        m(feats, [masks[0].float(), masks[1]])


def test_config_validation_reports_connector_problems():
    """The config pass (before any weights load) surfaces check_config's problems under the section key."""
    from cambrian_core.config.schema import check_component

    bad = dict(DEFAULT_DIMS, type="sva", in_token_lens=[16, 36])
    problems = check_component("connectors", bad, "model.connector")
    assert [p.key for p in problems] == ["model.connector"]
    assert "window side 6/4 is not an integer" in problems[0].message
    assert check_component("connectors", dict(bad, in_token_lens=[16, 64]), "model.connector") == []


def test_sva_row_moments_and_their_gradient_check() -> None:
    from cambrian_plugins.connectors._sva_layers import _row_moments

    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_row_moments, (x,))
    y = (torch.randn(4, 6, 64) * 3 + 1).requires_grad_(True)
    mean, square = _row_moments(y)
    torch.testing.assert_close(mean, y.mean(-1))
    torch.testing.assert_close(square, y.square().mean(-1), rtol=1e-5, atol=1e-5)
    g_mean, g_square = torch.randn_like(mean), torch.randn_like(square)
    (ours,) = torch.autograd.grad((mean * g_mean).sum() + (square * g_square).sum(), y)
    expected = g_mean.unsqueeze(-1) / 64 + 2 * y.detach() * g_square.unsqueeze(-1) / 64
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert _row_moments(y.detach().bfloat16())[1].dtype == torch.float32  # bf16 rows: fp32 moments


def test_compiling_sva_is_refused_on_a_torch_with_wrong_compiled_gradients(monkeypatch):
    import cambrian_plugins.connectors.sva as sva_module

    for version, release in (("2.14.1", (2, 14)), ("2.13.0+cpu", (2, 13)), ("2.12.0a0+git1234", (2, 12))):
        monkeypatch.setattr(torch, "__version__", version)
        assert sva_module._torch_release() == release
    assert "torch 2.12.0a0+git1234" in SVAConnector.compile_problem()  # measured wrong on 2.11, right on 2.13
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    assert SVAConnector.compile_problem() is None
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    m = _ref_model()
    with pytest.raises(
        RuntimeError, match=r"wrong gradients with padding masks on torch 2\.11\.0\+cu130 .* >= 2\.13"
    ):
        m.compile()
    assert m._compiled_call_impl is None  # nothing was compiled
