"""``cambrian export hf``: plain ``LlavaForConditionalGeneration`` (no remote code) and ``trust_remote_code`` folders."""

from __future__ import annotations

import json

import export_helpers as H
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

from cambrian_core.cli import main
from cambrian_core.export.hf import export_hf
from cambrian_core.export.hf_llava import NEWLINE_TOKEN, expand_image_ids, expand_image_tokens
from cambrian_core.model.io import load_model


def _llava_inputs(hf, tok, model, batch):
    ids, mask = expand_image_ids(
        batch["input_ids"],
        batch["attention_mask"],
        hf.config.image_token_id,
        tok.convert_tokens_to_ids(NEWLINE_TOKEN),
        model.grid,
    )
    return ids, mask


@pytest.mark.parametrize(
    ("tower", "kwargs", "strategy"), [("clip", {}, "default"), ("siglip_hf", {"select_layer": -1}, "full")]
)
def test_llava_export_loads_in_plain_transformers_with_identical_logits(tmp_path, tower, kwargs, strategy):
    model = H.make(H.mlp_config(tower, **kwargs))
    src = model.save_pretrained(str(tmp_path / "ours"))
    assert main(["export", "hf", src, str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    assert not list(out.glob("*.py"))  # no remote code
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert hf.config.vision_feature_select_strategy == strategy
    batch = H.inputs(model)
    ids, mask = _llava_inputs(hf, tok, model, batch)
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = hf(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"][0]).logits
    assert ours.shape[:2] == theirs.shape[:2]
    keep = mask.bool()
    assert torch.allclose(ours[keep], theirs[keep][:, : ours.shape[-1]], atol=1e-5, rtol=0)
    # greedy generation: the added image tokens are suppressed, so the continuations agree
    one_ids, one_mask = ids[:1], mask[:1]
    new = hf.generate(
        input_ids=one_ids,
        attention_mask=one_mask,
        pixel_values=batch["pixel_values"][0],
        max_new_tokens=6,
        do_sample=False,
    )
    ref = model.generate(
        batch["input_ids"][:1],
        batch["attention_mask"][:1],
        pixel_values=batch["pixel_values"],
        max_new_tokens=6,
    )
    assert new[0, one_ids.shape[1] :].tolist() == ref[0].tolist()


def test_prompt_expansion_matches_the_id_expansion(tmp_path):
    model = H.make(H.mlp_config())
    out = export_hf(model.save_pretrained(str(tmp_path / "ours")), tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(out)
    hf_cfg = json.loads((out / "config.json").read_text())
    prompt = "What is <image> here"
    ids = tok(expand_image_tokens(prompt, model.grid), add_special_tokens=False)["input_ids"]
    assert (
        ids.count(hf_cfg["image_token_index"]) == 16
        and ids.count(tok.convert_tokens_to_ids(NEWLINE_TOKEN)) == 4
    )
    gen = json.loads((out / "generation_config.json").read_text())
    assert hf_cfg["image_token_index"] in gen["suppress_tokens"]
    card = (out / "README.md").read_text()
    assert "LlavaForConditionalGeneration" in card and '("<image>" * 4 + "<image_newline>") * 4' in card


def test_a_bf16_llava_export_says_bf16_in_every_config(tmp_path):
    from safetensors import safe_open

    model = H.make(H.mlp_config())
    out = export_hf(model.save_pretrained(str(tmp_path / "ours")), tmp_path / "hf", fmt="llava", dtype="bf16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["text_config"]["dtype"] == cfg["vision_config"]["dtype"] == "bfloat16"
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            assert {sf.get_slice(k).get_dtype() for k in sf.keys()} == {"BF16"}  # noqa: SIM118
    assert LlavaForConditionalGeneration.from_pretrained(out).dtype == torch.bfloat16


def test_models_llava_cannot_hold_are_refused_with_reasons(tmp_path):
    sva = H.make(H.sva_config())
    src = sva.save_pretrained(str(tmp_path / "sva"))
    with pytest.raises(
        ValueError, match=r"Llava has one vision tower; this model has 2.*connector is SVAConnector"
    ):
        export_hf(src, tmp_path / "out", fmt="llava")
    post_norm = H.make(H.mlp_config("siglip_hf"))  # select_layer=None: after the final norm
    src = post_norm.save_pretrained(str(tmp_path / "pn"))
    with pytest.raises(ValueError, match="select_layer=None"):
        export_hf(src, tmp_path / "out", fmt="llava")
    assert not (tmp_path / "out").exists()
    # auto falls back to remote code for it
    out = export_hf(src, tmp_path / "auto")
    assert (out / "modeling_cambrian.py").is_file()


def test_sva_remote_code_export_generates_our_tokens(tmp_path):
    model = H.make(H.sva_config())
    src = model.save_pretrained(str(tmp_path / "ours"))
    assert main(["export", "hf", src, str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(hf).__name__ == "CambrianForCausalLM"
    batch = H.inputs(model)
    assert torch.equal(H.logits(model, batch), hf(**batch).logits)
    ours = model.generate(
        batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"], max_new_tokens=8
    )
    theirs = hf.generate(
        batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"], max_new_tokens=8
    )
    assert torch.equal(ours, theirs)
    assert torch.equal(H.logits(load_model(out), batch), H.logits(model, batch))  # still a cambrian folder
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_cambrian.CambrianForCausalLM"
    assert "trust_remote_code=True" in (out / "README.md").read_text()


def test_remote_export_can_cast(tmp_path):
    model = H.make(H.sva_config())
    src = model.save_pretrained(str(tmp_path / "ours"))
    out = export_hf(src, tmp_path / "hf", fmt="remote", dtype="bf16")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    assert json.loads((out / "cambrian_config.json").read_text())["model"]["llm"]["dtype"] == "bfloat16"


def test_the_model_card_code_alone_reproduces_our_answer(tmp_path, monkeypatch, capsys):
    """Image file -> answer by running the exported card's code block, with nothing but the exported folder."""
    import re

    import numpy as np
    from PIL import Image

    model = H.make(H.mlp_config())
    export_hf(model.save_pretrained(str(tmp_path / "ours")), tmp_path / "hf")
    side = model.towers[0].image_size  # square, at the tower's resolution: the card's exact case
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(tmp_path / "scan.png")
    card = (tmp_path / "hf" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, flags=re.S).group(1)
    assert (
        "from cambrian" not in code and "add_special_tokens=False" in code
    )  # llama-3's format starts with BOS
    monkeypatch.chdir(tmp_path)  # the card names the folder by its name
    capsys.readouterr()
    exec(code.replace("PATH", repr("scan.png")), {})
    theirs = capsys.readouterr().out.strip()
    ours = model.chat("<image>\nDescribe the image.", [Image.open(tmp_path / "scan.png")], max_new_tokens=64)
    assert theirs == ours and ours


def test_remote_save_pretrained_keeps_other_folders_and_refuses_what_it_cannot_do(tmp_path):
    model = H.make(H.mlp_config("siglip_hf"))
    out = export_hf(model.save_pretrained(str(tmp_path / "ours")), tmp_path / "hf", fmt="remote")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "train.py").write_text("# my code")
    with pytest.raises(FileExistsError, match=r"proj is a folder holding other things \(train\.py\)"):
        hf.save_pretrained(proj)
    assert [p.name for p in proj.iterdir()] == ["train.py"]
    with pytest.raises(TypeError, match=r"does not support push_to_hub=True \(save, then upload"):
        hf.save_pretrained(tmp_path / "again", push_to_hub=True)
    with pytest.raises(
        TypeError, match=r"does not support variant=; it takes save_directory and max_shard_size"
    ):
        hf.save_pretrained(tmp_path / "again", variant="fp16")
    assert not (tmp_path / "again").exists()
    hf.save_pretrained(out)  # replacing a saved model is fine
    hf.save_pretrained(tmp_path / "again")
    batch = H.inputs(model)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True)
    assert torch.equal(again(**batch).logits, H.logits(model, batch))


def test_the_llava_card_says_auto_processor_is_not_supported(tmp_path):
    model = H.make(H.mlp_config())
    out = export_hf(model.save_pretrained(str(tmp_path / "ours")), tmp_path / "hf", fmt="llava")
    card = (out / "README.md").read_text()
    assert not (out / "processor_config.json").exists()
    assert "`AutoProcessor` / `LlavaProcessor` are not supported with this folder" in card
    assert "without the `<image_newline>` token that\nends each row here" in card
