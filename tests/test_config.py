"""Configs: inheritance, overrides, one-pass validation with file/key/suggestion, show and diff."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cambrian_core import CONNECTORS, MODELS
from cambrian_core.cli.config_cmd import diff_configs, flatten
from cambrian_core.config import ConfigError, load_config, parse_cfg_options
from cambrian_core.plugins import ensure_loaded

CFG = Path(__file__).parent / "data" / "configs"
REPO = Path(__file__).resolve().parent.parent


class ToyConnector:
    def __init__(self, connector_depth: int = 3, num_query_group: int = 1) -> None:
        self.depth = connector_depth

    @classmethod
    def check_config(cls, kwargs: dict) -> list[str]:
        depth = kwargs.get("connector_depth", 3)
        return [] if depth >= 1 else [f"connector_depth must be >= 1, got {depth}"]


class ToyVLM:
    config_components = {"connector": "connectors"}

    def __init__(self, connector: dict, hidden: int = 64) -> None:
        self.connector, self.hidden = connector, hidden


@pytest.fixture(autouse=True)
def toy_components():
    ensure_loaded()
    CONNECTORS.register_module(name="toy_connector", module=ToyConnector, force=True)
    MODELS.register_module(name="toy_vlm", module=ToyVLM, force=True)
    yield
    for reg, name in ((CONNECTORS, "toy_connector"), (MODELS, "toy_vlm")):
        reg._module_dict.pop(name, None)
        reg.providers.pop(name, None)


def test_base_merge_reference_and_override() -> None:
    cfg = load_config(CFG / "toy_leaf.py")
    assert cfg.model.connector == {"type": "toy_connector", "connector_depth": 2, "num_query_group": 1}
    assert cfg.model.hidden == 64
    assert cfg.schedule.epochs == 1  # {{_base_.schedule.grad_accum}}
    assert cfg.schedule.warmup_ratio == 0.03
    assert cfg.optim.lr_groups == {"projector": 1e-3, "sva": 1e-4}


def test_delete_replaces_instead_of_merging() -> None:
    cfg = load_config(CFG / "toy_delete.py")
    assert cfg.optim.to_dict() == {"lr": 5e-5}


def test_cfg_options_override_nested_and_literal() -> None:
    cfg = load_config(
        CFG / "toy_leaf.py", ["model.connector.connector_depth=5", "optim.lr_groups.sva=2e-4", "seed=7"]
    )
    assert cfg.model.connector.connector_depth == 5
    assert cfg.optim.lr_groups.sva == 2e-4
    assert cfg.seed == 7
    assert parse_cfg_options(["a.b=[1, 2]", "c=abc", "d=True"]) == {"a.b": [1, 2], "c": "abc", "d": True}
    # shell and YAML habits: `model.unpad=false` must not become the (truthy) string "false"
    words = parse_cfg_options(["a=false", "b=FALSE", "c=true", "d=none", "e=null", "f=None", "g=falsey"])
    assert words == {"a": False, "b": False, "c": True, "d": None, "e": None, "f": None, "g": "falsey"}


def test_misspelled_keys_reported_together_with_file_line_and_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CFG / "toy_typo.py")
    msg = str(info.value)
    assert "2 problem(s)" in msg
    assert "toy_typo.py:3: model.connector.conector_depth" in msg
    assert "did you mean `connector_depth`?" in msg
    assert "toy_typo.py:5: schedule.warmup_ration: unknown key; did you mean `warmup_ratio`?" in msg


def test_unknown_type_and_wrong_keyword() -> None:
    with pytest.raises(
        ConfigError,
        match=r"model\.connector\.type: Unknown connector type `toy_conector`.*Did you mean `toy_connector`",
    ):
        load_config(CFG / "toy_unknown_type.py")
    with pytest.raises(
        ConfigError,
        match=r"toy_bad_kwarg\.py:2: model\.hiden: `model toy_vlm` got an unexpected keyword `hiden` \(did you mean `hidden`\?\)",
    ):
        load_config(CFG / "toy_bad_kwarg.py")


def test_component_cross_checks_run_before_build() -> None:
    with pytest.raises(ConfigError, match="connector_depth must be >= 1, got 0"):
        load_config(CFG / "toy_check.py")


def test_bad_override_is_attributed_to_cfg_options() -> None:
    with pytest.raises(
        ConfigError, match=r"--cfg-options: schedule\.epoch: unknown key; did you mean `epochs`"
    ):
        load_config(CFG / "toy_leaf.py", ["schedule.epoch=3"])


def test_overrides_inside_lists_and_whole_part_problems_are_attributed() -> None:
    demo = Path(__file__).parent.parent / "configs" / "demo" / "cambrian_tiny_med.py"
    with pytest.raises(ConfigError) as info:
        load_config(demo, ["model.vision_tower_aux_list.0.tokn_len=144"])
    assert (
        "--cfg-options: model.vision_tower_aux_list[0].tokn_len: `encoder efficientnet_lite0` got an"
        in str(info.value)
    )
    with pytest.raises(ConfigError) as info:  # a cross-check of the whole model, caused by the override
        load_config(demo, ["model.vision_tower_aux_list.1.token_len=144"])
    assert "with --cfg-options model.vision_tower_aux_list.1.token_len: model: " in str(info.value)


def test_unknown_top_level_section() -> None:
    with pytest.raises(ConfigError, match="unknown top-level key; did you mean `schedule`"):
        load_config(CFG / "toy_leaf.py", {"schedul": {"epochs": 2}})


def test_lora_section_is_checked_at_load_and_may_be_off() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CFG / "toy_leaf.py", ["lora.rr=8", "lora.dropout=high"])
    msg = str(info.value)
    assert "--cfg-options: lora.rr: unknown key; did you mean `r`?" in msg
    assert "lora.dropout: expected float, got 'high'" in msg
    assert load_config(CFG / "toy_leaf.py", {"lora": None, "eval": None}).lora is None
    assert load_config(CFG / "toy_leaf.py", ["lora.r=8"]).lora.r == 8


def test_unused_sections_are_not_accepted_silently() -> None:
    with pytest.raises(ConfigError, match="serve: unknown top-level key"):
        load_config(CFG / "toy_leaf.py", {"serve": {"port": 1}})


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(CFG / "nope.py")


def test_flatten_and_diff() -> None:
    a = {"model": {"connector": {"depth": 3}, "towers": [{"t": "a"}, {"t": "b"}]}, "lr": 1}
    b = {"model": {"connector": {"depth": 2}, "towers": [{"t": "a"}]}, "lr": 1, "new": True}
    assert flatten(a)["model.towers[1].t"] == "b"
    assert diff_configs(a, b) == [
        ("model.connector.depth", 3, 2),
        ("model.towers[1].t", "b", "<absent>"),
        ("new", "<absent>", True),
    ]
    # an empty section is a value: {} differs from absent and from None
    assert diff_configs({"log": {"wandb": {}, "n": 1}}, {"log": {"n": 1}}) == [("log.wandb", {}, "<absent>")]
    assert diff_configs({"x": {}}, {"x": None}) == [("x", {}, None)]


def test_cli_show_and_diff() -> None:
    # the toy components exist only in this process, so the CLI checks run on unvalidated loads
    run = [sys.executable, "-m", "cambrian_core.cli", "config"]
    show = subprocess.run(
        [*run, "show", str(CFG / "toy_delete.py"), "--no-check"], capture_output=True, text=True
    )
    assert show.returncode == 0, show.stderr
    assert "optim = dict(lr=5e-05)" in show.stdout
    diff = subprocess.run(
        [*run, "diff", str(CFG / "toy_leaf.py"), str(CFG / "toy_delete.py")], capture_output=True, text=True
    )
    assert diff.returncode == 0, diff.stderr
    assert re.search(r"optim\.lr_groups\.sva\s+0\.0001 -> '<absent>'", diff.stdout), diff.stdout
    bad = subprocess.run([*run, "show", str(CFG / "toy_typo.py")], capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean `warmup_ratio`" in bad.stderr


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("syntax.py", "x = dict(\n", r"syntax\.py:1: Python syntax error: '\(' was never closed"),
        ("raises.py", "x = 1 / 0\n", r"raises\.py: cannot be read .*ZeroDivisionError: division by zero"),
        ("broken.json", '{"a": \n', r"broken\.json: cannot be read .*JSONDecodeError"),
        ("base.py", "_base_ = ['./nope.py']\n", r"base\.py: a `_base_` file does not exist: .*nope\.py"),
        ("scan.png", "not a config", r"scan\.png: not a config file; use a \.py"),
    ],
)
def test_unreadable_config_files_name_the_file_and_line(tmp_path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_values_out_of_range_are_config_problems() -> None:
    bad = {
        "optim": {"lr": -1, "type": "Adamw"},
        "schedule": {"max_steps": -4, "precision": "fp8", "warmup_ratio": 1.5},
        "data": {"num_workers": -2},
        "checkpoint": {"interval": 0},
    }
    with pytest.raises(ConfigError) as info:
        load_config(CFG / "toy_leaf.py", bad)
    msg = str(info.value)
    for line in (
        "optim.lr: must be >= 0, got -1",
        "optim.type: must be one of AdamW, Adam, SGD, got 'Adamw'",
        "schedule.max_steps: must be -1 (off) or >= 1, got -4",
        "schedule.precision: must be one of bf16, fp16, fp32, got 'fp8'",
        "schedule.warmup_ratio: must be between 0 and 1, got 1.5",
        "data.num_workers: must be >= 0, got -2",
        "checkpoint.interval: must be >= 1, got 0",
    ):
        assert line in msg, line


def test_the_checked_names_are_the_ones_training_uses() -> None:
    from cambrian_core.config.schema import OPTIMIZERS, PRECISIONS, SCHEDULERS
    from cambrian_core.train.optim import _OPTIMIZERS, lr_lambda
    from cambrian_core.train.runners.base import PRECISIONS as RUNNER_PRECISIONS

    assert set(OPTIMIZERS) == set(_OPTIMIZERS) and set(PRECISIONS) == set(RUNNER_PRECISIONS)
    for kind in SCHEDULERS:
        assert 0.0 <= lr_lambda(5, 10, 1, kind) <= 1.0


def test_a_syntax_error_in_a_base_file_names_that_file(tmp_path) -> None:
    (tmp_path / "bad.py").write_text("seed = 1\n\n\n\nx = (\n")
    (tmp_path / "leaf.py").write_text("_base_ = ['./bad.py']\nwork_dir = 'w'\n")
    with pytest.raises(ConfigError, match=r"bad\.py:5: Python syntax error: '\(' was never closed") as err:
        load_config(tmp_path / "leaf.py")
    assert "leaf.py:5" not in str(err.value)


def test_a_bool_is_not_an_int_in_top_level_keys() -> None:
    from cambrian_core.config.schema import validate_tree

    assert [(p.key, p.message) for p in validate_tree({"seed": True})] == [("seed", "expected int, got True")]
    assert not validate_tree({"seed": 3, "resume": True, "load_from": None})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plugins", "list", "--kind", "bogus"], "error: unknown kind `bogus`; kinds: encoders"),
        (["convert", "pmc_oa", "--src", ".", "--out", "x", "--opt", "foo"], "error: --opt expects KEY=VALUE"),
    ],
)
def test_usage_errors_exit_2_with_the_message(argv, message, capsys) -> None:
    from cambrian_core.cli import main

    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2 and message in capsys.readouterr().err


DEMO = REPO / "configs" / "demo" / "cambrian_tiny_med_pretrain.py"


def test_dict_and_list_values_are_type_checked_item_by_item() -> None:
    from cambrian_core.config.schema import validate_tree

    # a dotted --cfg-options key splits a module prefix with dots into nested dicts: a problem with the fix
    with pytest.raises(ConfigError) as info:
        load_config(CFG / "toy_leaf.py", ["optim.lr_groups.connector.mm_projector=5e-4"])
    msg = str(info.value)
    assert "optim.lr_groups: expected dict[str, float], got {" in msg
    assert "a key with dots is one key: write optim.lr_groups={'connector.mm_projector': 0.0005}" in msg
    cfg = load_config(CFG / "toy_leaf.py", ["optim.lr_groups={'connector.mm_projector': 5e-4}"])
    assert cfg.optim.lr_groups["connector.mm_projector"] == 5e-4
    bad = validate_tree({"eval": {"metrics": ["accuracy", 3]}, "optim": {"betas": ("a", 0.9)}})
    assert [p.key for p in bad] == ["eval.metrics", "optim.betas"]


def test_overrides_that_do_not_fit_the_config_are_problems_of_cfg_options(tmp_path) -> None:
    off = tmp_path / "lora_off.py"
    off.write_text(f"_base_ = [{str(CFG / 'toy_leaf.py')!r}]\nlora = None\n")
    assert load_config(off, ["lora.r=8"]).lora == {"r": 8}  # a sub-key of a None section makes it a dict
    assert load_config(off, ["lora={'r': 8}"]).lora == {"r": 8}
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["model.vision_tower_aux_list.2.freeze=False", "data.batch_size.x=1"])
    msg = str(info.value)
    assert (
        "--cfg-options: model.vision_tower_aux_list.2.freeze: `model.vision_tower_aux_list` has 2 item(s) "
        "(indexes 0..1), so there is no item 2" in msg
    )
    assert "--cfg-options: data.batch_size.x: `data.batch_size` is 4 (int), not a dict" in msg
    # list items are set by index without touching the `{{_base_.x}}` value they were copied from
    cfg = load_config(
        REPO / "configs" / "cambrian" / "sva_llama3_8b_pretrain.py",
        ["model.vision_tower_aux_list.0.freeze=False", "model.vision_tower_aux_token_len_list.3=576"],
        validate=False,
    )
    assert cfg.model.vision_tower_aux_list[0]["freeze"] is False and "freeze" not in cfg._towers[0]
    assert cfg.model.vision_tower_aux_token_len_list == [576] * 4


def test_problems_are_attributed_by_their_whole_key_path(tmp_path) -> None:
    (tmp_path / "myeval.py").write_text('eval = dict(benchmark="vqa_rad", data="d", batch_size=0)\n')
    (tmp_path / "cross.py").write_text(
        f"_base_ = [{str(DEMO)!r}, './myeval.py']\ndata = dict(batch_size=2)\n"
    )
    (tmp_path / "same.py").write_text(
        f"_base_ = [{str(DEMO)!r}]\nlog = dict(interval=1)\ncheckpoint = dict(interval=0, keep_last=1)\n"
    )
    (tmp_path / "towers.py").write_text(
        "# my towers\n_towers = [\n"
        "    dict(type='efficientnet_lite0', pretrained=True, image_size=224, token_len=256),\n"
        "    dict(type='timmm', model_name='vit_tiny_patch16_224', image_size=224, token_len=64),\n]\n"
    )
    (tmp_path / "leaf.py").write_text(
        f"_base_ = [{str(DEMO)!r}, './towers.py']\nmodel = dict(vision_tower_aux_list={{{{_base_._towers}}}})\n"
    )
    expected = {
        "cross.py": "myeval.py:1: eval.batch_size: must be >= 1",
        "same.py": "same.py:3: checkpoint.interval: must be >= 1",
        "leaf.py": "towers.py:4: model.vision_tower_aux_list[1].type: Unknown encoder type `timmm`",
    }
    for name, where in expected.items():
        with pytest.raises(ConfigError) as info:
            load_config(tmp_path / name)
        assert f"{tmp_path}{__import__('os').sep}{where}" in str(info.value), str(info.value)
    with pytest.raises(ConfigError) as info:  # a section only the override brings in: its problem alone
        load_config(DEMO, ["optm.lr=1e-4"])
    assert "  - --cfg-options: optm: unknown top-level key; did you mean `optim`?" in str(info.value)


def test_configs_are_named_as_config_list_prints_them(capsys, tmp_path) -> None:
    from cambrian_core.cli import main

    assert main(["config", "list", "ablations"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed and all(n.startswith("cambrian::ablations/") for n in listed)
    assert main(["config", "list", "demo/"]) == 0
    demo = capsys.readouterr().out.split()
    assert "cambrian::demo/cambrian_tiny_med.py" in demo and len(demo) == 3
    assert load_config(demo[0], validate=False).model.type == "cambrian"
    with pytest.raises(ConfigError, match=r"unknown config scope `nosuch` in `nosuch::demo/x\.py`; known"):
        load_config("nosuch::demo/x.py")
    # a package that is not a config scope (nor one of mmengine's) is an unknown scope, not a mim lookup
    for pkg in ("cambrian_core", "numpy"):
        (tmp_path / f"{pkg}.py").write_text(f"_base_ = ['{pkg}::demo/cambrian_tiny_med.py']\n")
        with pytest.raises(
            ConfigError, match=rf"_base_: unknown config scope `{pkg}` .* known scopes: .*cambrian"
        ):
            load_config(tmp_path / f"{pkg}.py")


def test_unquoted_lists_in_cfg_options_are_read_as_mmengine_reads_them() -> None:
    opts = ["data.train=[a.jsonl,b.jsonl]", "x=a,b", "y=(1,b)", "z=two words", "w=[a,(b"]
    assert parse_cfg_options(opts) == {
        "data.train": ["a.jsonl", "b.jsonl"],
        "x": ["a", "b"],
        "y": (1, "b"),
        "z": "two words",
        "w": "[a,(b",
    }
