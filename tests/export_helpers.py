"""Tiny real-plugin models for the export tests: HF CLIP / SigLIP towers, a tiny Llama-3 LLM, SVA or mlp2x_gelu,
and a writer of the exact Cambrian-1 folder layout (config fields and state-dict names)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cambrian_core import MODELS, build, plugins
from cambrian_core.model.tokenize import IMAGE_TOKEN_INDEX

VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
LLM = {
    "type": "llama3",
    "config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    },
}
CLIP_NAME = "openai/clip-vit-large-patch14-336"
SIGLIP_NAME = "siglip/CLIP-ViT-SO400M-14-384"


def sva_config(**connector: Any) -> dict[str, Any]:
    """CLIP + SigLIP (4x4 grids) -> SVA (16 heads, as Cambrian-1) with two in-LLM samplers -> 2x2 image grid."""
    conn = {
        "type": "sva",
        "vision_hidden_size": 32,
        "num_heads": 16,
        "connector_depth": 2,
        "connector_only": False,
        "num_of_vision_sampler_layers": 2,
        "start_of_vision_sampler_layers": 0,
        "stride_of_vision_sampler_layers": 2,
        **connector,
    }
    return {
        "type": "cambrian",
        "vision_tower_aux_list": [
            {"type": "clip", "config": dict(VISION)},
            {"type": "siglip_hf", "config": dict(VISION)},
        ],
        "vision_tower_aux_token_len_list": [16, 16],
        "llm": LLM,
        "connector": conn,
        "image_token_len": 4,
    }


def mlp_config(tower: str = "clip", **tower_kwargs: Any) -> dict[str, Any]:
    """One HF tower at its native 4x4 grid -> mlp2x_gelu -> 16 image tokens (a LLaVA-shaped model)."""
    return {
        "type": "cambrian",
        "vision_tower_aux_list": [{"type": tower, "config": dict(VISION), **tower_kwargs}],
        "llm": LLM,
        "connector": {"type": "mlp2x_gelu"},
        "image_token_len": 16,
    }


def make(cfg: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    plugins.load_plugins()
    torch.manual_seed(seed)
    model = build(MODELS, cfg)
    with torch.no_grad():  # move every weight off its init so nothing passes by accident
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def inputs(model: torch.nn.Module, seed: int = 1) -> dict[str, Any]:
    """A two-sample batch: text, one image, text (left sample) and text only (right sample)."""
    tok = model.tokenizer
    a = tok("What is in the image?", add_special_tokens=False)["input_ids"]
    b = tok("The lungs are clear.", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[*a[:3], IMAGE_TOKEN_INDEX, *a[3:]], b + [tok.pad_token_id] * (len(a) + 1 - len(b))])
    mask = torch.tensor([[1] * (len(a) + 1), [1] * len(b) + [0] * (len(a) + 1 - len(b))])
    g = torch.Generator().manual_seed(seed)
    px = [torch.randn(1, 3, t.image_size, t.image_size, generator=g) for t in model.towers]
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": px}


def logits(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def save_towers(model: torch.nn.Module, folder: Path) -> list[Path]:
    """Each HF tower as a local HF folder (what a Cambrian-1 user downloads separately)."""
    out = []
    for i, tower in enumerate(model.towers):
        path = folder / f"tower{i}"
        tower.model.save_pretrained(path)
        out.append(path)
    return out


def cambrian1_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under Cambrian-1's names (no towers: Cambrian-1 never saved them)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("towers."):
            continue
        if k == "image_newline":
            out["model.image_newline"] = v
        elif k.startswith("connector."):
            out["model." + k[len("connector.") :]] = v
        else:
            assert k.startswith("llm.model."), k
            out[k[len("llm.model.") :]] = v
    return {k: v.clone() for k, v in out.items()}


def cambrian1_config(model: torch.nn.Module, tower_names: list[str]) -> dict[str, Any]:
    """config.json as Cambrian-1's ``CambrianLlamaForCausalLM`` writes it (LLaMA fields + mm_* + SVA fields)."""
    cfg = model.llm.model.config.to_dict()
    conn = model.model_config["connector"]
    cfg.update(
        model_type="cambrian_llama",
        architectures=["CambrianLlamaForCausalLM"],
        mm_vision_tower_aux_list=tower_names,
        mm_vision_tower_aux_token_len_list=[t.token_len for t in model.towers],
        vision_tower_aux_token_len_list=[t.token_len for t in model.towers],
        image_token_len=model.image_token_len,
        mm_projector_type=conn["type"],
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        image_position=35,
        tune_mm_mlp_adapter=False,
        unfreeze_mm_vision_tower=False,
        tokenizer_model_max_length=512,
        tokenizer_padding_side="right",
        use_mm_proj=True,
        torch_dtype="float32",
    )
    if conn["type"] == "sva":
        cfg.update(
            vision_hidden_size=conn["vision_hidden_size"],
            num_query_group=1,
            query_num_list=[model.image_token_len],
            connector_depth=conn["connector_depth"],
            connector_only=conn["connector_only"],
            num_of_vision_sampler_layers=conn["num_of_vision_sampler_layers"],
            start_of_vision_sampler_layers=conn["start_of_vision_sampler_layers"],
            stride_of_vision_sampler_layers=conn["stride_of_vision_sampler_layers"],
        )
    return cfg


def write_cambrian1(model: torch.nn.Module, folder: Path, tower_names: list[str], shards: int = 2) -> Path:
    """A Cambrian-1 HF folder: config.json, tokenizer files, ``model-0000i-of-0000N.safetensors`` + index."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cambrian1_config(model, tower_names), indent=2))
    model.tokenizer.save_pretrained(folder)
    state = cambrian1_state(model)
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder
