"""Packed attention (``cambrian_sdpa``) and the target-only LM loss, for every registered LLM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cambrian_core import LLMS, build
from cambrian_core.model.attention import VARLEN_ATTENTION, segment_bounds, varlen_sdpa_forward
from cambrian_core.model.tokenize import IGNORE_INDEX


def test_segment_bounds_split_samples_and_the_padding_tail() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 0, 1, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    # row 0: samples [0,3) [3,5), padding [5,7); row 1: samples [7,11) [11,14)
    assert segment_bounds(pos, mask).tolist() == [0, 3, 5, 7, 11, 14]
    assert segment_bounds(pos, mask).dtype == torch.int32


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_attention_equals_a_block_causal_mask(kv_heads: int) -> None:
    g = torch.Generator().manual_seed(0)
    b, h, length, d = 2, 4, 9, 8
    q = torch.randn(b, h, length, d, generator=g)
    k = torch.randn(b, kv_heads, length, d, generator=g)
    v = torch.randn(b, kv_heads, length, d, generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 0], [0, 1, 0, 1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[1] * 7 + [0, 0], [1] * 9])
    cu = segment_bounds(pos, mask)
    module = torch.nn.Module().eval()
    out, _ = varlen_sdpa_forward(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu)

    seg = torch.zeros(b * length, dtype=torch.long)
    seg[cu[1:-1].long()] = 1
    seg = seg.cumsum(0).view(b, length)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    rep = h // kv_heads
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=allowed[:, None], scale=0.3
    )
    assert out.shape == (b, length, h, d)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_without_bounds_it_is_transformers_sdpa() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g) for _ in range(3))
    module = torch.nn.Module().eval()
    module.is_causal = True
    ours, _ = varlen_sdpa_forward(module, q, k, v, None)
    theirs, _ = sdpa_attention_forward(module, q, k, v, None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", LLMS.names())
def test_target_loss_equals_the_full_loss_and_its_gradients(name: str) -> None:
    torch.manual_seed(0)
    llm = build(LLMS, {"type": name, **LLMS.get(name).tiny_config()})
    hf = llm.model
    if getattr(hf.config, "_attn_implementation", None) == "sdpa":
        pytest.fail(f"{name}: attn_implementation sdpa should run as {VARLEN_ATTENTION}")
    vocab = hf.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, 11))
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # prompt
    labels[1, 8:] = IGNORE_INDEX  # right padding
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    embeds = llm.embed_tokens(ids)

    full = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss
    (g_full,) = torch.autograd.grad(full, [p for p in hf.parameters() if p.requires_grad][-1])
    part = llm.target_loss(labels, inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    assert part is not None, f"{name}: a plain LM head should take the target-only path"
    (g_part,) = torch.autograd.grad(part, [p for p in hf.parameters() if p.requires_grad][-1])
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_part, g_full, rtol=1e-4, atol=1e-6)


def test_target_loss_declines_heads_it_cannot_reproduce() -> None:
    llm = build(LLMS, {"type": "llama3", **LLMS.get("llama3").tiny_config()})
    llm.model.config.final_logit_softcapping = 30.0  # e.g. Gemma-2: logits are capped after the head
    labels = torch.zeros(1, 4, dtype=torch.long)
    assert llm.target_loss(labels, inputs_embeds=torch.zeros(1, 4, llm.hidden_size)) is None
