"""``merge-lora``: a LoRA-trained model merged into a plain one gives the unmerged model's logits."""

from __future__ import annotations

import json

import export_helpers as H
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cambrian_core.cli import main
from cambrian_core.export.lora import LoraMergeError, merge_lora
from cambrian_core.model.io import load_model
from cambrian_core.train.lora import LoraSettings, apply_lora

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def _trained(tmp_path, connector_too: bool = True):
    """Base folder + the model after a (simulated) LoRA run: adapter weights and the connector moved."""
    model = H.make(H.mlp_config())
    base = model.save_pretrained(str(tmp_path / "base"))
    apply_lora(model, LoraSettings.from_config(LORA))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or (connector_too and name.startswith("connector.")):
                p.add_(torch.randn_like(p) * 0.1)
    return base, model.eval()


def _checkpoint(model, folder, lora=LORA):
    """What the trainer's checkpoint holds: trainable.safetensors + the run's config.json."""
    folder.mkdir(parents=True)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(n.startswith("connector.") for n in trainable)
    save_file(trainable, str(folder / "trainable.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model": {}, "data": {"train": []}, "lora": lora}))
    return folder


def test_merged_checkpoint_gives_the_unmerged_logits(tmp_path):
    base, trained = _trained(tmp_path)
    batch = H.inputs(trained)
    want = H.logits(trained, batch)
    ckpt = _checkpoint(trained, tmp_path / "work" / "checkpoints" / "step_00000010")
    assert main(["export", "merge-lora", base, str(ckpt), str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    got = H.logits(merged, batch)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(H.logits(load_model(base), batch), want, atol=1e-3)  # the adapter mattered
    for f in (tmp_path / "merged").glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            assert not [k for k in sf.keys() if "lora" in k or "base_model" in k]  # noqa: SIM118
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "LoRA merged" in card and "## Training config" in card and '"r": 4' in card


def test_merged_peft_adapter_folder(tmp_path):
    base, trained = _trained(tmp_path, connector_too=False)
    batch = H.inputs(trained)
    want = H.logits(trained, batch)
    trained.llm.model.save_pretrained(str(tmp_path / "lora_adapter"))
    out = merge_lora(base, tmp_path / "lora_adapter", tmp_path / "merged")
    assert torch.allclose(H.logits(load_model(out), batch), want, atol=1e-5, rtol=0)


def test_adapter_problems_are_named(tmp_path):
    base, trained = _trained(tmp_path)
    ckpt = _checkpoint(trained, tmp_path / "ckpt")
    with pytest.raises(LoraMergeError, match="size mismatch"):
        (ckpt / "config.json").write_text(json.dumps({"model": {}, "data": {}, "lora": {**LORA, "r": 8}}))
        merge_lora(base, ckpt, tmp_path / "o1")
    (ckpt / "config.json").write_text(json.dumps({"model": {}, "data": {}}))
    with pytest.raises(LoraMergeError, match="has no `lora` section"):
        merge_lora(base, ckpt, tmp_path / "o2")
    other = _checkpoint(trained, tmp_path / "ckpt2")
    state = {"connector.bogus.weight": torch.zeros(1)}
    save_file(state, str(other / "trainable.safetensors"))
    with pytest.raises(LoraMergeError, match=r"no place for .*connector\.bogus\.weight"):
        merge_lora(base, other, tmp_path / "o3")
    with pytest.raises(FileNotFoundError, match="neither a training checkpoint"):
        merge_lora(base, tmp_path, tmp_path / "o4")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_a_model_with_an_unmerged_adapter_is_not_saved(tmp_path):
    _, trained = _trained(tmp_path)
    batch = H.inputs(trained)
    want = H.logits(trained, batch)
    with pytest.raises(
        ValueError,
        match=r"cannot save: the LLM carries an unmerged peft \(LoRA\) adapter.*merge_and_unload\(\).*"
        r"`cambrian export merge-lora`",
    ):
        trained.save_pretrained(str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()
    trained.llm.model = trained.llm.model.merge_and_unload()  # merged, it saves and loads back
    got = H.logits(load_model(trained.save_pretrained(str(tmp_path / "m"))), batch)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
