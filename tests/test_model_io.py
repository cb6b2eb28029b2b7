"""Saving and loading the composed model: self-contained folders, sharding, atomicity, named checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cambrian_parts as P
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from cambrian_core import CHECKPOINTS, ENCODERS, LLMS, MODELS, build
from cambrian_core.cli import main
from cambrian_core.model import io
from cambrian_core.model.checkpoints import NamedCheckpoint, build_from_config, get_checkpoint
from cambrian_core.model.io import CONFIG_NAME, INDEX_NAME, load_model, read_config
from cambrian_core.model.template import Message
from cambrian_core.model.tokenize import IMAGE_TOKEN_INDEX


@pytest.fixture(autouse=True)
def _parts() -> None:
    P.register()


def make(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build(MODELS, P.model_config(**overrides))


def probe(model) -> torch.Tensor:
    tok = model.tokenizer
    ids = torch.tensor([[tok.eos_token_id, IMAGE_TOKEN_INDEX, tok.eos_token_id]])
    g = torch.Generator().manual_seed(0)
    px = [torch.randn(1, 3, t.image_size, t.image_size, generator=g) for t in model.towers]
    with torch.no_grad():
        return model.eval()(ids, pixel_values=px, image_sizes=torch.tensor([[64, 40]])).logits


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = make(stage="pretrain")
    with torch.no_grad():
        model.image_newline.add_(1.0)  # weights that differ from any fresh init
    folder = model.save_pretrained(str(tmp_path / "m"))
    loaded = load_model(folder)
    assert_same_state(model, loaded)
    assert torch.equal(probe(model), probe(loaded))
    assert loaded.stage == "pretrain" and not loaded.training
    assert {n.split(".")[0] for n, p in loaded.named_parameters() if p.requires_grad} == {
        "connector",
        "image_newline",
    }


def test_towers_are_restored_from_the_folder_alone(tmp_path):
    torch.manual_seed(9)
    source = P.PatchTower(width=24, patch=8)
    weights = tmp_path / "tower.pt"
    torch.save(source.state_dict(), weights)
    towers = [
        {"type": "test_patch", "width": 24, "patch": 8, "weights": str(weights)},
        {"type": "test_patch", "width": 20, "patch": 4},
    ]
    model = make(vision_tower_aux_list=towers)
    folder = Path(model.save_pretrained(str(tmp_path / "m")))
    weights.unlink()  # the original tower weights are gone
    text = (folder / CONFIG_NAME).read_text()
    assert "tower.pt" not in text and str(tmp_path / "m") not in text  # no outside source, no absolute path
    moved = tmp_path / "moved"
    folder.rename(moved)  # the folder is relocatable
    loaded = load_model(moved)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.towers[0].state_dict()[k], v)
    assert_same_state(model, loaded)


def test_sharded_weights_and_index_are_consistent(tmp_path):
    model = make()
    folder = Path(model.save_pretrained(str(tmp_path / "m"), max_shard_size="40KB"))
    index = json.loads((folder / INDEX_NAME).read_text())
    shards = sorted({*index["weight_map"].values()})
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in folder.glob("*.safetensors")) == shards
    state = model.state_dict()
    assert index["aliases"] == {"llm.model.lm_head.weight": "llm.model.model.embed_tokens.weight"}
    assert set(index["weight_map"]) | set(index["aliases"]) == set(state)
    total = 0
    for shard in shards:
        with safe_open(str(folder / shard), "pt") as f:
            keys = set(f.keys())
            assert keys == {k for k, v in index["weight_map"].items() if v == shard}
            for k in keys:
                t = f.get_tensor(k)
                assert torch.equal(t, state[k])
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total
    assert_same_state(model, load_model(folder))


def test_one_shard_still_gets_a_numbered_file_and_an_index(tmp_path):
    folder = Path(make().save_pretrained(str(tmp_path / "m")))
    assert sorted(p.name for p in folder.glob("model*")) == ["model-00001-of-00001.safetensors", INDEX_NAME]


def test_saved_dtypes_are_kept_and_load_can_cast(tmp_path):
    towers = [
        {"type": "test_patch", "width": 24, "patch": 8, "dtype": "bfloat16"},
        {"type": "test_patch", "width": 20, "patch": 4},
    ]
    model = make(vision_tower_aux_list=towers)
    model.llm.to(torch.float64)  # differs from what the config would build
    folder = model.save_pretrained(str(tmp_path / "m"))
    loaded = load_model(folder)
    assert loaded.towers[0].proj.weight.dtype == torch.bfloat16
    assert loaded.llm.model.lm_head.weight.dtype == torch.float64
    assert loaded.llm.model.lm_head.weight is loaded.llm.model.model.embed_tokens.weight  # still tied
    assert_same_state(model, loaded)
    half = load_model(folder, dtype="bfloat16")
    assert next(load_model(folder, dtype="bf16").parameters()).dtype == torch.bfloat16  # the short names too
    with pytest.raises(ValueError, match=r"dtype 'bf61' is not supported; use one of float32, fp32"):
        load_model(folder, dtype="bf61")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_saving_over_a_folder_is_atomic(tmp_path, monkeypatch):
    dest = tmp_path / "m"
    first = make(seed=1)
    first.save_pretrained(str(dest))
    before = {p.name: p.read_bytes() for p in dest.iterdir() if p.is_file()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        make(seed=2).save_pretrained(str(dest))
    assert {p.name: p.read_bytes() for p in dest.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary leftovers
    monkeypatch.undo()
    second = make(seed=2)
    second.save_pretrained(str(dest))
    assert_same_state(second, load_model(dest))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_unreadable_folders_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved cambrian model"):
        load_model(tmp_path)
    folder = Path(make().save_pretrained(str(tmp_path / "m")))
    meta = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match=r"version 99 is not readable.*upgrade cambrian"):
        read_config(folder)
    with pytest.raises(
        FileNotFoundError, match="neither a saved model folder nor a registered checkpoint name"
    ):
        load_model("no-such-model")


# ------------------------------------------------------------------------------------------------ names
def register_checkpoint(name: str, **kwargs) -> None:
    CHECKPOINTS.register_module(name=name, module=lambda: NamedCheckpoint(name=name, **kwargs), force=True)


def test_load_by_registered_name_from_a_folder(tmp_path):
    model = make(seed=3)
    model.save_pretrained(str(tmp_path / "m"))
    register_checkpoint("test-folder", folder=str(tmp_path / "m"), description="a local folder")
    assert get_checkpoint("test-folder").availability() == (True, "local folder")
    assert_same_state(model, load_model("test-folder"))


def test_hub_checkpoints_are_never_fetched_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    ckpt = NamedCheckpoint(name="test-hub", hub_id="example-org/cambrian-none")
    ok, why = ckpt.availability()
    assert not ok and "needs a network" in why
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set, so it is not fetched"):
        ckpt.resolve()


def test_builder_checkpoints_build_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CAMBRIAN_CACHE", str(tmp_path))
    register_checkpoint("test-built", config=P.model_config(), builder=build_from_config)
    ckpt = get_checkpoint("test-built")
    assert ckpt.availability() == (True, f"built on first use into {tmp_path / 'checkpoints' / 'test-built'}")
    first = load_model("test-built")
    assert (tmp_path / "checkpoints" / "test-built" / CONFIG_NAME).is_file()
    assert ckpt.availability()[1].startswith("built, cached at")
    assert_same_state(first, load_model("test-built"))
    missing = NamedCheckpoint(
        name="x", config={}, builder=build_from_config, requires=("no_such_module_xyz",)
    )
    assert missing.availability() == (False, "missing packages providing no_such_module_xyz")
    with pytest.raises(ValueError, match="exactly one of folder / hub_id / builder"):
        NamedCheckpoint(name="y", folder="a", hub_id="b")


def test_models_list_shows_source_and_offline_availability(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    register_checkpoint("test-hub-list", hub_id="example-org/cambrian-none")
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"test-hub-list +NOT available offline: needs a network to download example-org/cambrian-none", out
    )
    assert "source: hub: example-org/cambrian-none" in out
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["test-hub-list"]["available"] is False
    assert rows["cambrian-tiny-med"]["source"] == "builder: cambrian_core.model.checkpoints.build_from_config"


# ------------------------------------------------------------------------------------------------ registry
def registered(registry) -> list[str]:
    return [n for n in registry.names() if not n.startswith("test_")]


@pytest.mark.parametrize("name", registered(ENCODERS))
def test_every_registered_encoder_is_restored_from_the_folder_alone(name, tmp_path):
    tower = {"type": name, **ENCODERS.get(name).tiny_config(), "token_len": 16}
    model = make(seed=11, vision_tower_aux_list=[tower], connector={"type": "mlp2x_gelu"})
    folder = model.save_pretrained(str(tmp_path / "m"))
    saved = read_config(folder)["vision_tower_aux_list"][0]
    assert saved["type"] == name
    loaded = load_model(folder)
    assert_same_state(model, loaded)
    assert torch.equal(probe(model), probe(loaded))


@pytest.mark.parametrize("name", registered(LLMS))
def test_every_registered_llm_round_trips(name, tmp_path):
    llm = {"type": name, **LLMS.get(name).tiny_config()}
    model = make(seed=12, llm=llm, connector={"type": "test_grid", "num_samplers": 2})
    loaded = load_model(model.save_pretrained(str(tmp_path / "m")))
    assert_same_state(model, loaded)
    assert torch.equal(probe(model), probe(loaded))
    prompt = [Message("user", "<image>\nhi")]
    assert loaded.llm.template.render_text(prompt, True) == model.llm.template.render_text(prompt, True)
    assert loaded.tokenizer("a <image> b")["input_ids"] == model.tokenizer("a <image> b")["input_ids"]


@pytest.mark.slow
def test_cambrian_tiny_med_loads_by_name_with_its_real_weights():
    """Builds once into the cambrian cache (GGUF conversion + EfficientNet weights), then loads by name."""
    from cambrian_plugins.encoders.efficientnet_lite0 import efficientnet_lite0_state_dict

    ok, why = get_checkpoint("cambrian-tiny-med").availability()
    if not ok:
        pytest.skip(why)
    model = load_model("cambrian-tiny-med")
    assert [type(t).__name__ for t in model.towers] == ["EfficientNetLite0Encoder", "TimmEncoder"]
    assert model.connector.sampler_layers == (0, 10, 20) and len(model.llm.decoder_layers) == 30
    real = efficientnet_lite0_state_dict()
    trunk = model.towers[0].trunk.state_dict()
    assert all(
        torch.equal(trunk[k], real[k]) for k in trunk
    )  # the ImageNet weights, restored from the folder
    answer = model.chat("What is a chest X-ray used for?", max_new_tokens=12)
    assert "chest" in answer.lower() or "lung" in answer.lower()
    image = Image.new("RGB", (96, 64), (120, 120, 120))
    assert model.chat("Describe the image.", [image], max_new_tokens=6).strip()


def test_a_truncated_shard_or_corrupt_config_is_named(tmp_path):
    from cambrian_core.model.io import ModelFileError, load_weights

    folder = Path(make().save_pretrained(str(tmp_path / "m")))
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(
        ModelFileError, match=rf"{shard.name} cannot be read as safetensors .* truncated or corrupt"
    ):
        load_weights(folder)
    (folder / "cambrian_config.json").write_text('{"format": "cambrian",\n')
    with pytest.raises(ModelFileError, match=r"cambrian_config\.json is not valid JSON"):
        read_config(folder)
    assert main(["export", "hf", str(folder), str(tmp_path / "out")]) == 2  # an error line, not a traceback


def test_components_given_as_classes_are_saved_by_their_registered_names(tmp_path):
    from cambrian_core import CONNECTORS

    tower = {"type": ENCODERS.get("clip"), **ENCODERS.get("clip").tiny_config(), "token_len": 16}
    model = make(seed=13, vision_tower_aux_list=[tower], connector={"type": CONNECTORS.get("mlp2x_gelu")})
    folder = model.save_pretrained(str(tmp_path / "m"))
    saved = read_config(folder)
    assert saved["vision_tower_aux_list"][0]["type"] == "clip" and saved["connector"]["type"] == "mlp2x_gelu"
    assert_same_state(model, load_model(folder))


@pytest.mark.parametrize(
    "command", [["infer"], ["eval", "jsonl"], ["demo"], ["serve", "worker"], ["serve", "api"]]
)
def test_every_model_loader_takes_tower_paths_for_cambrian1_folders(command, capsys):
    """A Cambrian-1 folder needs ``--tower-path NAME=DIR`` for its towers, wherever a model is loaded."""
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    assert "--tower-path NAME=DIR" in capsys.readouterr().out


def test_a_model_needing_uninstalled_parts_names_all_of_them(tmp_path):
    from cambrian_core.registry import BuildError

    folder = make(seed=14).save_pretrained(str(tmp_path / "m"))
    meta = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    meta["model"]["vision_tower_aux_list"][0]["type"] = "tp_tower"
    meta["model"]["connector"]["type"] = "tp_connector"
    meta["model"]["llm"]["type"] = "tp_llm"
    (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(BuildError) as err:
        load_model(folder)
    text = str(err.value)
    assert "encoder `tp_tower` (vision_tower_aux_list[0]); connector `tp_connector`; LLM `tp_llm`" in text
    assert "cambrian plugins list" in text


# ------------------------------------------------------------------------------------------------ review fixes
def test_saving_never_replaces_a_folder_holding_other_things(tmp_path):
    run = (tmp_path / "run").resolve()
    (run / "checkpoints" / "step_00000100").mkdir(parents=True)
    (run / "notes.txt").write_text("important")
    model = make()
    with pytest.raises(
        FileExistsError,
        match=rf"{re.escape(str(run))} is a folder holding other things \(checkpoints, notes\.txt\), not a saved "
        r"cambrian model.*save into a new or empty folder",
    ):
        model.save_pretrained(str(run))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "notes.txt"]
    assert (run / "notes.txt").read_text() == "important"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a saved cambrian model"):
        model.save_pretrained(str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_same_state(model, load_model(model.save_pretrained(str(empty))))  # an empty folder is filled
    other = make(seed=5)
    assert_same_state(other, load_model(other.save_pretrained(str(empty))))  # a saved model is replaced


def test_weights_that_do_not_fit_the_architecture_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = Path(make().save_pretrained(str(tmp_path / "m")))
    index = json.loads((folder / INDEX_NAME).read_text())
    shard = folder / index["weight_map"]["image_newline"]
    state = load_file(str(shard))
    state["image_newline_v0"] = state.pop("image_newline")
    save_file(state, str(shard))
    index["weight_map"]["image_newline_v0"] = index["weight_map"].pop("image_newline")
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(
        io.ModelFileError,
        match=rf"{re.escape(str(folder))}: its weights do not fit the model its cambrian_config\.json builds: "
        r"1 missing \['image_newline'\], 1 unexpected \['image_newline_v0'\], 0 of another shape \[\]; it was "
        r"saved from another model .* save it again, or load what fits with strict=False",
    ):
        load_model(folder)
    assert load_model(folder, strict=False) is not None  # strict=False loads what fits


def _partial_snapshot(tmp_path, src: Path) -> Path:
    """A hub cache whose snapshot of example-org/cambrian-x was cut short: config, index and llm/, no shard."""
    import shutil

    repo = tmp_path / "hub" / "models--example-org--cambrian-x"
    rev = "a" * 40
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    shutil.copytree(src / "llm", snap / "llm")
    for name in (CONFIG_NAME, INDEX_NAME):
        shutil.copy(src / name, snap / name)
    return snap


def test_a_partly_downloaded_hub_snapshot_is_finished_not_used(monkeypatch, tmp_path):
    import shutil

    import huggingface_hub
    from huggingface_hub import constants

    model = make(seed=4)
    src = Path(model.save_pretrained(str(tmp_path / "m")))
    snap = _partial_snapshot(tmp_path, src)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = NamedCheckpoint(name="test-partial", hub_id="example-org/cambrian-x")
    ok, why = ckpt.availability()
    assert not ok
    assert re.search(
        r"only partly downloaded into the Hugging Face cache \(.*shard model-00001-of-00001\.safetensors listed "
        r"in model\.safetensors\.index\.json is missing\); finish it with a network: `hf download "
        r"example-org/cambrian-x`",
        why,
    ), why
    with pytest.raises(
        FileNotFoundError,
        match=r"\(example-org/cambrian-x\) is only partly downloaded.*HF_HUB_OFFLINE is set",
    ):
        ckpt.resolve()
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # online, the download is finished first
        monkeypatch.delenv(var, raising=False)
    real = huggingface_hub.snapshot_download

    def download(repo_id, local_files_only=False, **kwargs):
        if not local_files_only:  # what the hub would send: the missing shard
            shutil.copy(src / "model-00001-of-00001.safetensors", snap)
        return real(repo_id, local_files_only=True, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert ckpt.resolve().resolve() == snap.resolve()
    assert_same_state(model, load_model(snap))


def test_a_builder_checkpoint_is_rebuilt_when_its_registered_config_changes(monkeypatch, tmp_path):
    monkeypatch.setenv("CAMBRIAN_CACHE", str(tmp_path))
    folder = tmp_path / "checkpoints" / "test-rebuilt"
    register_checkpoint("test-rebuilt", config=P.model_config(), builder=build_from_config)
    load_model("test-rebuilt")
    towers = [
        {"type": "test_patch", "width": 16, "patch": 8},
        {"type": "test_patch", "width": 20, "patch": 4},
    ]
    register_checkpoint(
        "test-rebuilt", config=P.model_config(vision_tower_aux_list=towers), builder=build_from_config
    )  # a new plugin version ships another model under the same name
    assert get_checkpoint("test-rebuilt").availability() == (
        True,
        f"the copy cached at {folder} was built from another config than the registered one; rebuilt on "
        "first use",
    )
    assert_same_state(make(seed=0, vision_tower_aux_list=towers), load_model("test-rebuilt"))
    assert get_checkpoint("test-rebuilt").availability() == (True, f"built, cached at {folder}")
