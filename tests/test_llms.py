"""LLM plugins: every registered LLM in tiny form (forward, contract, save -> rebuild), loading from a local
folder, options and their errors, and the real SmolLM2-135M-Instruct converted from its PyPI GGUF (slow)."""

from __future__ import annotations

import re

import pytest
import torch

from cambrian_core import plugins
from cambrian_core.model.llm import LanguageModel
from cambrian_core.model.template import Message
from cambrian_core.model.tokenize import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from cambrian_core.registry import LLMS, build

plugins.ensure_loaded()
NAMES = LLMS.names()
OURS = ["hermes_yi", "hf_causal_lm", "llama3", "smollm2", "vicuna"]

CONV = [
    Message("user", "<image>\nWhat does the chest X-ray show?"),
    Message("assistant", "No acute abnormality."),
]


def tiny(name: str, **overrides) -> LanguageModel:
    return build(LLMS, {"type": name, **LLMS.get(name).tiny_config(), **overrides})


def test_our_llms_are_registered():
    assert set(OURS) <= set(NAMES)


@pytest.fixture(scope="module", params=NAMES)
def built(request):
    torch.manual_seed(0)
    return request.param, tiny(request.param)


def test_forward_and_contract(built):
    _, llm = built
    cfg = llm.model.config
    assert isinstance(llm, LanguageModel)
    assert llm.hidden_size == cfg.hidden_size
    assert len(llm.decoder_layers) == cfg.num_hidden_layers
    assert llm.tokenizer.pad_token is not None and llm.tokenizer.pad_token_id is not None
    ids = torch.randint(0, len(llm.tokenizer), (2, 7))
    out = llm(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (2, 7, cfg.vocab_size)
    emb = llm.embed_tokens(ids)
    assert emb.shape == (2, 7, llm.hidden_size)
    out2 = llm(inputs_embeds=emb, attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(out2.logits, out.logits)


def test_one_cached_step_equals_the_full_forward(built):
    """The KV cache reaches the LLM under the name its forward takes (an unknown keyword is dropped silently
    by transformers, which would decode every step without the prompt)."""
    _, llm = built
    ids = torch.randint(0, len(llm.tokenizer), (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = llm.model(input_ids=ids, attention_mask=mask).logits[:, -1]
        pre = llm.model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        cache = getattr(pre, "cache", None) or pre.past_key_values
        step = llm.model(
            input_ids=ids[:, 6:], attention_mask=mask, use_cache=True, **{llm.cache_keyword: cache}
        )
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-4, atol=1e-4)


def test_cache_keyword_follows_the_forward_signature():
    from cambrian_core.model.llm import _cache_keyword

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    class Wrapper(torch.nn.Module):
        def forward(self, *args, **kwargs): ...

    assert _cache_keyword(Old) == "past_key_values"
    assert _cache_keyword(New) == "cache"
    import inspect

    from transformers import LlamaForCausalLM

    installed = (
        "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
    )
    assert _cache_keyword(Wrapper) == installed  # **kwargs only: the installed transformers' convention


def test_save_rebuild_identical_logits(built, tmp_path):
    name, llm = built
    kwargs = llm.save_pretrained(str(tmp_path / "llm"))
    assert "type" not in kwargs
    rebuilt = build(LLMS, {"type": name, **kwargs})
    missing, unexpected = rebuilt.load_state_dict(llm.state_dict(), strict=True)
    assert not missing and not unexpected
    llm.eval(), rebuilt.eval()
    ids = torch.randint(0, len(llm.tokenizer), (1, 9))
    with torch.no_grad():
        assert torch.equal(llm(input_ids=ids).logits, rebuilt(input_ids=ids).logits)
    assert rebuilt.tokenizer.pad_token == llm.tokenizer.pad_token
    if name in OURS:
        assert rebuilt.tokenize(CONV) == llm.tokenize(CONV)
        assert rebuilt.template.render(CONV) == llm.template.render(CONV)


@pytest.mark.parametrize("name", OURS)
def test_tokenize_trains_only_the_reply(name):
    llm = tiny(name)
    tc = llm.tokenize(CONV)
    trained = [t for t, label in zip(tc.input_ids, tc.labels, strict=True) if label != IGNORE_INDEX]
    assert llm.tokenizer.decode(trained).strip() == "No acute abnormality." + llm.template.stop_strings[0]
    assert tc.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert set(llm.stop_token_ids) >= {llm.tokenizer.convert_tokens_to_ids(llm.template.stop_strings[0])}
    # loss on the trainable labels runs through the causal LM
    ids = torch.tensor([[t if t >= 0 else 0 for t in tc.input_ids]])
    loss = llm(input_ids=ids, labels=torch.tensor([tc.labels])).loss
    assert torch.isfinite(loss)


PADS = {
    "llama3": "<|reserved_special_token_0|>",
    "vicuna": "<unk>",
    "hermes_yi": "<unk>",
    "smollm2": "<|im_end|>",
    "hf_causal_lm": "<|endoftext|>",  # no pad, no unk: falls back to eos
}
TEMPLATES_BY_LLM = {
    "llama3": "llama_3",
    "vicuna": "vicuna_v1",
    "hermes_yi": "chatml_direct",
    "smollm2": "hf_chat",
    "hf_causal_lm": "chatml_direct",
}


@pytest.mark.parametrize("name", OURS)
def test_family_pad_and_template(name):
    llm = tiny(name)
    assert llm.tokenizer.pad_token == PADS[name]
    assert llm.template.name == TEMPLATES_BY_LLM[name]


def test_load_weights_from_local_folder(tmp_path):
    torch.manual_seed(1)
    llm = tiny("llama3")
    folder = tmp_path / "hf"
    llm.model.save_pretrained(folder)
    llm.save_pretrained(str(folder))
    loaded = build(LLMS, {"type": "llama3", "path": str(folder)})
    ids = torch.randint(0, len(llm.tokenizer), (1, 6))
    with torch.no_grad():
        assert torch.equal(llm.eval()(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits)
    fresh = build(LLMS, {"type": "llama3", "path": str(folder), "load_weights": False})
    assert not torch.equal(fresh.model.lm_head.weight, llm.model.lm_head.weight)
    # the generic plugin loads the same folder; its default template (hf_chat) needs a chat template
    with pytest.raises(ValueError, match="has no chat template"):
        build(LLMS, {"type": "hf_causal_lm", "path": str(folder)})
    generic = build(LLMS, {"type": "hf_causal_lm", "path": str(folder), "template": "llama_3"})
    assert generic.tokenize(CONV) == loaded.tokenize(CONV)
    assert LLMS.get("llama3").config_hidden_size({"path": str(folder)}) == llm.hidden_size


def test_options(tmp_path):
    llm = tiny("vicuna", dtype="bfloat16", gradient_checkpointing=True, system="Be brief.")
    assert next(llm.parameters()).dtype == torch.bfloat16
    assert getattr(llm.model, "is_activation_checkpointing", None) or llm.model.is_gradient_checkpointing
    assert llm.template.render_text(CONV).startswith("Be brief. USER:")
    llm.train()
    ids = torch.randint(0, len(llm.tokenizer), (1, 5))
    llm(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in llm.decoder_layers.parameters())
    compat = tiny("llama3", cambrian1_compat=True)
    assert compat.template.cambrian1_compat and compat.template.add_bos
    kwargs = compat.save_pretrained(str(tmp_path / "c"))
    assert kwargs["cambrian1_compat"] is True
    assert build(LLMS, {"type": "llama3", **kwargs}).template.render(CONV) == compat.template.render(CONV)
    assert LLMS.get("vicuna").config_hidden_size(LLMS.get("vicuna").tiny_config()) == 64


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("flash_attn") is not None, reason="flash-attn is installed here"
)
def test_flash_attention_needs_flash_attn():
    with pytest.raises(ValueError, match=re.escape("pip install cambrian[flash]")):
        tiny("llama3", attn_implementation="flash_attention_2")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"path": "/nonexistent/llama", "config": None}, "not a local folder; nothing is downloaded"),
        ({"path": "/tmp", "config": {"hidden_size": 8}}, "either `path`"),
        ({"config": None}, "give `path`"),
        ({"dtype": "float8"}, "dtype 'float8' is not one of"),
        ({"attn_implementation": "xformers"}, "attn_implementation 'xformers' is not one of"),
        ({"template": "llama_4"}, "unknown chat template 'llama_4'"),
        ({"template": "hf_chat", "cambrian1_compat": True}, "has no cambrian1_compat mode"),
    ],
)
def test_bad_configs(kwargs, match):
    cfg = {**LLMS.get("llama3").tiny_config(), **kwargs}
    assert any(re.search(match, p) for p in LLMS.get("llama3").check_config(cfg))
    with pytest.raises(ValueError, match=match):
        build(LLMS, {"type": "llama3", **cfg})


@pytest.mark.parametrize(
    ("family", "template", "marker"),
    [("vicuna", "llama_3", "<|eot_id|>"), ("llama3", "chatml_direct", "<|im_start|>")],
)
def test_a_template_whose_markers_the_tokenizer_splits_is_refused(family, template, marker):
    with pytest.raises(
        ValueError,
        match=rf"chat template '{template}' needs its markers as single tokens.*{re.escape(repr(marker))} -> \d+ pieces.*template='hf_chat'",
    ):
        tiny(family, template=template)
    assert tiny(family).template.token_problems(tiny(family).tokenizer) == []  # its own template fits


def test_vocab_smaller_than_tokenizer_is_refused():
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        tiny("llama3", config={"hidden_size": 32, "num_hidden_layers": 1, "vocab_size": 10})


# ------------------------------------------------------------------------------------------ real SmolLM2
@pytest.mark.slow
def test_smollm2_real_weights(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from cambrian_plugins.llms import smollm2

    try:
        smollm2.gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("CAMBRIAN_CACHE", str(tmp_path))
    llm = build(LLMS, {"type": "smollm2"})
    folder = smollm2.smollm2_folder()
    assert folder == tmp_path / "smollm2-135m-instruct" and (folder / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    assert llm.hidden_size == 576 and len(llm.decoder_layers) == 30 and llm.template.name == "hf_chat"

    question = [Message("user", "What is a chest X-ray used for?")]
    # the tiny form's ChatML template renders exactly like the real tokenizer's
    tiny_form = tiny("smollm2")
    conv = [*question, Message("assistant", "To look at the lungs.")]
    assert tiny_form.template.render(conv) == llm.template.render(conv)

    prompt = llm.tokenize(question, add_generation_prompt=True)
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        out = llm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=40,
            do_sample=False,
            eos_token_id=llm.stop_token_ids,
            pad_token_id=llm.tokenizer.pad_token_id,
        )
    answer = llm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert re.search(r"chest|lung|diagnos", answer, re.IGNORECASE), answer

    # a second load uses the cache: conversion must not run again
    monkeypatch.setattr(smollm2, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    again = build(LLMS, {"type": "smollm2", "load_weights": False})
    assert again.model.config.hidden_size == 576
    assert LLMS.get("smollm2").config_hidden_size({}) == 576
