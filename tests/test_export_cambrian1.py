"""``import-cambrian1``: a tiny checkpoint in the exact Cambrian-1 layout -> our folder -> the same outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import export_helpers as H
import pytest
import torch
from safetensors.torch import load_file, save_file

from cambrian_core.cli import main
from cambrian_core.export.cambrian1 import Cambrian1ImportError, import_cambrian1, map_key, tower_config
from cambrian_core.model.io import CONFIG_NAME, load_model

NAMES = [H.CLIP_NAME, H.SIGLIP_NAME]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("c1")
    model = H.make(H.sva_config())
    towers = H.save_towers(model, root)
    src = H.write_cambrian1(model, root / "cambrian-8b-tiny", NAMES)
    return model, src, dict(zip(NAMES, towers, strict=True))


def test_cambrian1_layout_is_the_reference_one(setup):
    """Guard the fixture itself: Cambrian-1's names (§B.4) and config fields (§B.1)."""
    _, src, _ = setup
    keys = set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"])
    for key in (
        "model.mm_projector_aux_0.0.weight",
        "model.mm_projector_aux_1.3.bias",
        "model.vision_sampler_0.layers.1.cross_attn.k_proj_1.1.weight",
        "model.vision_sampler_0.layers.0.pos_embed_0",
        "model.vision_sampler_layers.1.layers.0.proj_in.weight",
        "model.mm_projector.2.weight",
        "model.vision_query",
        "model.image_newline",
        "model.layers.3.mlp.down_proj.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
    ):
        assert key in keys, key
    assert not any("vision_tower" in k for k in keys)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["model_type"] == "cambrian_llama" and cfg["mm_projector_type"] == "sva"
    assert cfg["mm_vision_tower_aux_list"] == NAMES and cfg["query_num_list"] == [4]


def test_import_reproduces_logits_and_generation(setup, tmp_path):
    model, src, towers = setup
    out = tmp_path / "ours"
    argv = ["export", "import-cambrian1", str(src), str(out)]
    for name, path in towers.items():
        argv += ["--tower-path", f"{name}={path}"]
    assert main(argv) == 0
    imported = load_model(out)
    batch = H.inputs(model)
    assert torch.equal(H.logits(model, batch), H.logits(imported, batch))
    one = {k: v[:1] if k != "pixel_values" else v for k, v in batch.items()}
    assert torch.equal(model.generate(**one, max_new_tokens=6), imported.generate(**one, max_new_tokens=6))
    meta = json.loads((out / CONFIG_NAME).read_text())
    cfg = meta["model"]
    assert [t["type"] for t in cfg["vision_tower_aux_list"]] == ["clip", "siglip_hf"]
    assert (
        cfg["llm"]["type"] == "llama3"
        and cfg["llm"]["template"] == "llama_3"
        and cfg["llm"]["cambrian1_compat"]
    )
    assert cfg["connector"]["num_heads"] == 16 and cfg["connector"]["stride_of_vision_sampler_layers"] == 2
    assert meta["imported_from"]["format"] == "cambrian1"
    assert "## Architecture" in (out / "README.md").read_text()


def _variant(src: Path, dst: Path, edit) -> Path:
    """A copy of the Cambrian-1 folder whose weights went through ``edit(state)`` (one file)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(f)))
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def _fails(src: Path, out: Path, towers: dict, match: str, exc=Cambrian1ImportError) -> None:
    with pytest.raises(exc, match=match):
        import_cambrian1(src, out, towers)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_unknown_missing_and_misshaped_weights_are_all_listed(setup, tmp_path):
    _, src, towers = setup

    def edit(state):
        state["model.vision_tower_aux_list.0.vision_tower.weight"] = torch.zeros(2)
        del state["model.vision_query"]
        state["lm_head.weight"] = state["lm_head.weight"][:-1]

    bad = _variant(src, tmp_path / "bad", edit)
    with pytest.raises(Cambrian1ImportError) as info:
        import_cambrian1(bad, tmp_path / "out", towers)
    msg = str(info.value)
    assert "checkpoint lacks (cambrian names) (1):\n  connector.vision_query" in msg
    assert (
        "no place for (1):\n  model.vision_tower_aux_list.0.vision_tower.weight (from model.safetensors)"
        in msg
    )
    assert "lm_head.weight: checkpoint (383, 64), model (384, 64)" in msg
    assert not (tmp_path / "out").exists()


def test_rotary_buffers_of_old_checkpoints_are_ignored(setup, tmp_path):
    model, src, towers = setup

    def edit(state):
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    out = import_cambrian1(_variant(src, tmp_path / "old", edit), tmp_path / "out", towers)
    batch = H.inputs(model)
    assert torch.equal(H.logits(model, batch), H.logits(load_model(out), batch))


def test_tower_paths_must_cover_every_tower_and_nothing_else(setup, tmp_path):
    _, src, towers = setup
    _fails(
        src,
        tmp_path / "out",
        {H.CLIP_NAME: towers[H.CLIP_NAME]},
        r"no local weights for the towers `siglip/CLIP-ViT-SO400M-14-384`",
    )
    _fails(
        src,
        tmp_path / "out",
        {**towers, "facebook/dinov2-giant": "x"},
        r"`facebook/dinov2-giant` are not towers of this model",
    )


def test_cli_reports_bad_tower_path_syntax(setup, tmp_path, capsys):
    _, src, _ = setup
    assert (
        main(["export", "import-cambrian1", str(src), str(tmp_path / "o"), "--tower-path", "no-equals-sign"])
        == 2
    )
    assert "is not NAME=DIR" in capsys.readouterr().err


def test_a_folder_without_config(tmp_path):
    (tmp_path / "x").mkdir()
    _fails(tmp_path / "x", tmp_path / "out", {}, "config.json is missing", FileNotFoundError)


def test_map_key():
    assert map_key("model.layers.0.mlp.up_proj.weight") == "llm.model.model.layers.0.mlp.up_proj.weight"
    assert map_key("lm_head.weight") == "llm.model.lm_head.weight"
    assert map_key("model.embed_tokens.weight") == "llm.model.model.embed_tokens.weight"
    assert map_key("model.image_newline") == "image_newline"
    assert map_key("model.vision_query") == "connector.vision_query"
    assert map_key("model.mm_projector_aux_2.3.weight") == "connector.mm_projector_aux_2.3.weight"
    assert map_key("model.mm_projector.0.bias") == "connector.mm_projector.0.bias"
    assert (
        map_key("model.vision_sampler_layers.9.layers.0.proj_in.weight")
        == "connector.vision_sampler_layers.9.layers.0.proj_in.weight"
    )


def test_tower_names_map_to_our_encoders(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    weights = tmp_path / "open_clip_pytorch_model.bin"
    weights.write_bytes(b"")
    assert tower_config(H.CLIP_NAME, hf, 576, -2) == {
        "type": "clip",
        "path": str(hf),
        "select_layer": -2,
        "token_len": 576,
    }
    assert tower_config(H.SIGLIP_NAME, hf, 576) == {"type": "siglip_hf", "path": str(hf), "token_len": 576}
    assert tower_config(H.SIGLIP_NAME, tmp_path, 576) == {
        "type": "siglip",
        "model_name": "vit_so400m_patch14_siglip_384",
        "checkpoint": str(weights),
        "image_size": 384,
        "token_len": 576,
    }
    conv = tower_config("clip-convnext-XXL-multi-stage", weights, 9216)
    assert conv == {
        "type": "convnext",
        "model_name": "convnext_xxlarge",
        "checkpoint": str(weights),
        "single_stage": False,
        "image_size": 1024,
        "token_len": 9216,
    }
    assert tower_config("clip-convnext-L-res768", weights, 576)["model_name"] == "convnext_large_d_320"
    assert tower_config("clip-convnext-L-res768", weights, 576)["image_size"] == 768
    assert tower_config("facebook/dinov2-giant-res378", hf, 576) == {
        "type": "dinov2",
        "path": str(hf),
        "image_size": 378,
        "token_len": 576,
    }
    own = tmp_path / "tower.json"
    own.write_text(json.dumps({"type": "timm", "model_name": "resnet18"}))
    assert tower_config("mae-vit-h-14", own, 256) == {
        "type": "timm",
        "model_name": "resnet18",
        "token_len": 256,
    }
    with pytest.raises(ValueError, match=r"no built-in mapping .*--tower-path 'mae-vit-h-14=tower.json'"):
        tower_config("mae-vit-h-14", hf, 256)
    with pytest.raises(ValueError, match="needs a local HF CLIP folder"):
        tower_config(H.CLIP_NAME, weights, 576)


def test_tied_embeddings_without_a_saved_lm_head(tmp_path):
    """transformers omits a tied ``lm_head.weight`` from checkpoints; the import ties it back."""
    cfg = H.mlp_config()
    cfg["llm"] = {**cfg["llm"], "config": {**cfg["llm"]["config"], "tie_word_embeddings": True}}
    model = H.make(cfg)
    towers = H.save_towers(model, tmp_path)
    src = H.write_cambrian1(model, tmp_path / "c1", [H.CLIP_NAME], shards=1)
    tied = _variant(src, tmp_path / "tied", lambda state: state.pop("lm_head.weight"))
    out = import_cambrian1(tied, tmp_path / "out", {H.CLIP_NAME: towers[0]})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["aliases"] == {"llm.model.lm_head.weight": "llm.model.model.embed_tokens.weight"}
    batch = H.inputs(model)
    assert torch.equal(H.logits(model, batch), H.logits(load_model(out), batch))
