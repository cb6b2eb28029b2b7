"""Stage freezing, per-module learning rates in the optimiser, the sqrt batch rule, the schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _train_fixtures import tiny_model_cfg, train_cfg, write_dataset
from mmengine.config import Config
from torch import nn

from cambrian_core.train.optim import build_scheduler, lr_lambda, param_groups, scaled_lr
from cambrian_core.train.recipe import TrainRecipe


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), n=16)


def setup_recipe(records: Path, work: Path, **over) -> TrainRecipe:
    recipe = TrainRecipe(Config(train_cfg(records, work, **over)), dry_run=True)
    recipe.checks()
    recipe.setup()
    return recipe


def trainable_modules(model: nn.Module) -> set[str]:
    return {name for name, group in model.param_groups().items() if group}


def test_stages_freeze_what_the_recipe_says(data: Path, tmp_path: Path) -> None:
    sva = {"model": tiny_model_cfg(connector="sva")}
    pre = setup_recipe(data, tmp_path / "pre", stage="pretrain", **sva)
    assert trainable_modules(pre.model) == {
        "connector",
        "connector.mm_projector",
        "connector.mm_projector_aux_0",
        "connector.mm_projector_aux_1",
        "connector.vision_sampler_0",
        "connector.vision_sampler_layers",
        "image_newline",
    }
    optimised = {id(p) for g in pre.runner.optimizer.param_groups for p in g["params"]}
    for name, p in pre.model.named_parameters():
        assert (id(p) in optimised) == p.requires_grad == (not name.startswith(("llm.", "towers."))), name
    fine = setup_recipe(data, tmp_path / "fine", stage="finetune", **sva)
    assert "llm" in trainable_modules(fine.model)
    assert not any(n.startswith("towers.") for n in trainable_modules(fine.model))
    full = setup_recipe(data, tmp_path / "full", stage="full")
    assert {"towers.0", "towers.1", "llm"} <= trainable_modules(full.model)


def test_per_module_learning_rates_reach_the_optimizer(data: Path, tmp_path: Path) -> None:
    recipe = setup_recipe(
        data,
        tmp_path,
        model=tiny_model_cfg(connector="sva"),
        optim={
            "lr": 1e-3,
            "weight_decay": 0.1,
            "lr_groups": {"connector.vision_sampler*": 1e-4, "connector.vision_query": 1e-4},
        },
    )
    by_param = {}
    for g in recipe.runner.optimizer.param_groups:
        for n in g["param_names"]:
            by_param[n] = (g["lr"], g["weight_decay"])
    assert by_param["connector.vision_query"][0] == 1e-4
    sampler = [
        n for n in by_param if n.startswith("connector.vision_sampler_layers.") and n.endswith("weight")
    ]
    assert sampler and all(by_param[n][0] == 1e-4 for n in sampler)
    proj = [n for n in by_param if n.startswith("connector.mm_projector")]
    assert all(by_param[n][0] == 1e-3 for n in proj)
    assert by_param["image_newline"] == (1e-3, 0.0)
    assert any(wd == 0.1 for _, wd in by_param.values())
    assert not any(n.startswith("llm.") for n in by_param)


def test_sqrt_batch_scaling_rule(data: Path, tmp_path: Path) -> None:
    assert scaled_lr(1e-3, 128, 512) == pytest.approx(5e-4)
    assert scaled_lr(2e-5, 1024, 512) == pytest.approx(2e-5 * math.sqrt(2))
    recipe = setup_recipe(
        data,
        tmp_path,
        data={"batch_size": 2},
        schedule={"grad_accum": 2},
        optim={
            "lr": 1e-3,
            "scale_lr_by_batch": True,
            "base_batch_size": 16,
            "lr_groups": {"image_newline": 4e-3},
        },
    )
    lrs = {g["name"].split("/")[0]: g["initial_lr"] for g in recipe.runner.optimizer.param_groups}
    assert lrs["base"] == pytest.approx(1e-3 * 0.5)  # global batch 4 = 2 x accum 2 x 1 rank
    assert lrs["image_newline"] == pytest.approx(4e-3 * 0.5)
    with pytest.raises(
        ValueError, match=r"lr_groups prefixes \[.connector\.typo.\] match no trainable parameter"
    ):
        setup_recipe(data, tmp_path / "typo", optim={"lr_groups": {"connector.typo": 1e-4}})


def test_param_groups_and_warmup_cosine() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    groups = param_groups(model.named_parameters(), 0.1, {"1": 0.5}, weight_decay=0.01)
    assert [(g["name"], g["param_names"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("base/decay", ["0.weight"], 0.1, 0.01),
        ("base/no_decay", ["0.bias"], 0.1, 0.0),
        ("1/no_decay", ["1.bias"], 0.5, 0.0),
    ]
    opt = torch.optim.SGD([p for g in groups for p in g["params"]], lr=1.0)
    sched = build_scheduler(opt, total_steps=10, warmup_ratio=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] == pytest.approx(lr_lambda(9, 10, 2))
    assert lr_lambda(10, 10, 2) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown scheduler `cosin`"):
        build_scheduler(opt, 10, kind="cosin")


def test_an_update_the_fp16_scaler_skips_does_not_advance_the_schedule() -> None:
    from cambrian_core.train.optim import build_optimizer
    from cambrian_core.train.runners.single import SingleRunner

    runner = SingleRunner("cpu")
    runner.setup()
    model = nn.Linear(4, 4)
    runner.prepare(
        model,
        lambda named: build_optimizer(param_groups(named, 1e-3), "AdamW"),
        lambda opt: build_scheduler(opt, total_steps=100, warmup_ratio=0.1),
        precision="fp32",
        clip_grad=1.0,
    )
    runner.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # what fp16 sets up (on CUDA only)
    before = model.weight.detach().clone()
    runner.backward((model(torch.ones(1, 4)) * float("inf")).sum())  # an overflowing fp16 backward
    assert math.isinf(runner.step())
    assert torch.equal(model.weight, before) and runner.scheduler.last_epoch == 0  # warm-up not used up
    runner.backward(model(torch.ones(1, 4)).sum())
    assert math.isfinite(runner.step())
    assert not torch.equal(model.weight, before) and runner.scheduler.last_epoch == 1
