"""Every config under configs/ loads and validates (bases, overrides, component keywords, cross-part checks).

The paper-scale configs read weights from ``$CAMBRIAN_WEIGHTS``; here that points at stand-in folders holding
the real models' ``config.json`` files (and empty tower checkpoints), so the cross-part checks (tower dims ->
SVA -> LLM width, sampler layers vs LLM depth) run on the real architectures without any weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cambrian_core.builtin import CONFIG_DIR
from cambrian_core.config import load_config

LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
}
STANDINS = {
    "clip-vit-large-patch14-336/config.json": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
    },
    "dinov2-giant/config.json": {
        "model_type": "dinov2",
        "hidden_size": 1536,
        "num_hidden_layers": 40,
        "num_attention_heads": 24,
        "mlp_ratio": 4,
        "use_swiglu_ffn": True,
        "image_size": 518,
        "patch_size": 14,
    },
    "Meta-Llama-3-8B-Instruct/config.json": {
        **LLAMA,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
    },
    "vicuna-13b-v1.5/config.json": {
        **LLAMA,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "Nous-Hermes-2-Yi-34B/config.json": {
        **LLAMA,
        "hidden_size": 7168,
        "intermediate_size": 20480,
        "num_hidden_layers": 60,
        "num_attention_heads": 56,
        "num_key_value_heads": 8,
        "vocab_size": 64000,
        "rope_theta": 5000000.0,
        "max_position_embeddings": 4096,
    },
    "siglip-so400m-patch14-384/open_clip_model.safetensors": None,
    "convnext-xxlarge-clip/open_clip_model.safetensors": None,
}
#: leaves (not _base_) under configs/: 12 seed-table leaves, the headline, 7 ablations, 3 demo configs
EXPECTED = 23


def leaf_configs() -> list[Path]:
    return sorted(p for p in CONFIG_DIR.rglob("*.py") if "_base_" not in p.parts)


@pytest.fixture(scope="module", autouse=True)
def standin_weights(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("weights")
    for rel, content in STANDINS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content)) if content is not None else path.write_bytes(b"")
    mp = pytest.MonkeyPatch()
    mp.setenv("CAMBRIAN_WEIGHTS", str(root))
    yield
    mp.undo()


def test_config_count() -> None:
    assert len(leaf_configs()) == EXPECTED, [str(p.relative_to(CONFIG_DIR)) for p in leaf_configs()]


@pytest.mark.parametrize("path", leaf_configs(), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model["type"] == "cambrian"
    if path.parent.name in ("cambrian", "ablations") or path.name == "sva_llama3.py":
        assert cfg.stage in ("pretrain", "finetune") and cfg.data.train.endswith("records.jsonl")


def test_seed_tables_are_reproduced() -> None:
    """Reference §C.5: tower set and token lengths, in-LLM sampler schedules, learning rates, batch bases."""
    rows = {
        "llama3_8b": (10, 3, 4e-5, 512, "llama3"),
        "vicuna_13b": (10, 4, 4e-5, 512, "vicuna"),
        "hermes_yi_34b": (9, 7, 2e-5, 1024, "hermes_yi"),
    }
    for name, (num, stride, lr, batch, llm) in rows.items():
        pre = load_config(CONFIG_DIR / "cambrian" / f"sva_{name}_pretrain.py")
        fine = load_config(CONFIG_DIR / "cambrian" / f"sva_{name}_finetune.py")
        for cfg in (pre, fine):
            m = cfg.model
            assert [t["type"] for t in m.vision_tower_aux_list] == ["siglip", "clip", "dinov2", "convnext"]
            assert m.vision_tower_aux_token_len_list == [576, 576, 576, 9216] and m.image_token_len == 576
            c = m.connector
            assert (c.type, c.connector_only, c.connector_depth, c.vision_hidden_size) == (
                "sva",
                False,
                3,
                1024,
            )
            assert (c.num_of_vision_sampler_layers, c.start_of_vision_sampler_layers) == (num, 0)
            assert c.stride_of_vision_sampler_layers == stride and m.llm.type == llm
            assert cfg.optim.base_batch_size == batch and cfg.optim.scale_lr_by_batch
        assert (pre.stage, pre.optim.lr, pre.schedule.warmup_ratio) == ("pretrain", 1e-3, 0.06)
        assert pre.optim.lr_groups == {"connector.vision_sampler*": 1e-4, "connector.vision_query": 1e-4}
        assert (fine.stage, fine.optim.lr, fine.schedule.warmup_ratio) == ("finetune", lr, 0.03)
        assert fine.load_from == f"work_dirs/sva_{name}_pretrain/model"
        mlp = load_config(CONFIG_DIR / "cambrian" / f"mlp2x_{name}_finetune.py")
        assert (
            mlp.model.connector.type == "mlp2x_gelu"
            and mlp.model.vision_tower_aux_token_len_list == [576] * 4
        )


def test_every_load_from_is_the_model_a_shipped_config_trains() -> None:
    """A stage-2 ``load_from`` names ``work_dirs/<stage-1 config name>/model`` (a run's default work dir)."""
    names = {p.stem: p for p in leaf_configs()}
    for path in leaf_configs():
        load_from = load_config(path, validate=False).get("load_from")
        if not load_from:
            continue
        parts = Path(load_from).parts
        assert parts[0] == "work_dirs" and parts[2:] == ("model",), (path.name, load_from)
        stage1 = names.get(parts[1])
        assert stage1 is not None, f"{path.name}: load_from {load_from} is the output of no shipped config"
        pre, fine = load_config(stage1), load_config(path)
        assert pre.stage == "pretrain" and pre.model.connector == fine.model.connector, (
            path.name,
            stage1.name,
        )


def test_ablations_differ_from_their_parent_by_one_thing() -> None:
    from cambrian_core.cli.config_cmd import diff_configs

    parent = load_config(CONFIG_DIR / "cambrian" / "sva_llama3_8b_finetune.py").to_dict()
    pre = load_config(CONFIG_DIR / "cambrian" / "sva_llama3_8b_pretrain.py").to_dict()
    cases = {
        "sva_llama3_8b_finetune_connector_only.py": (parent, {"model.connector.connector_only", "load_from"}),
        "sva_llama3_8b_finetune_packing.py": (parent, {"data.packing"}),
        "sva_llama3_8b_finetune_lora.py": (parent, {"lora.r", "lora.alpha", "lora.dropout"}),
        "sva_llama3_8b_finetune_zero3.py": (parent, {"runner.type", "runner.config"}),
        "sva_llama3_8b_pretrain_feature_cache.py": (pre, {"data.feature_cache"}),
        "sva_llama3_8b_pretrain_connector_only.py": (pre, {"model.connector.connector_only"}),
    }
    for name, (base, keys) in cases.items():
        changed = {
            k for k, _, _ in diff_configs(base, load_config(CONFIG_DIR / "ablations" / name).to_dict())
        }
        assert changed == keys, name
    two = {
        k.split("[")[0]
        for k, _, _ in diff_configs(
            pre, load_config(CONFIG_DIR / "ablations" / "sva_llama3_8b_pretrain_2towers.py").to_dict()
        )
    }
    assert two == {
        "_towers",
        "_token_lens",
        "model.vision_tower_aux_list",
        "model.vision_tower_aux_token_len_list",
    }
    headline = load_config(CONFIG_DIR / "sva_llama3.py").to_dict()
    assert diff_configs(headline, parent) == []
