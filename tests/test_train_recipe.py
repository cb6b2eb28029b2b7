"""The recipe end to end: what a run leaves behind, held-out evaluation, NaN stop, LoRA, packing, the CLI."""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import logging
import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from _train_fixtures import dump, losses, run, tiny_model_cfg, train_cfg, write_dataset
from PIL import Image
from safetensors.torch import load_file

from cambrian_core.cli import main
from cambrian_core.cli.train_cmd import launch_command
from cambrian_core.config import ConfigError
from cambrian_core.model.io import load_model
from cambrian_core.registry import MODELS, build
from cambrian_core.train.metrics import NonFiniteLossError
from cambrian_core.train.runners.base import Runner


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), n=20)


def test_run_outputs_metrics_and_eval(records: Path, tmp_path: Path) -> None:
    out = run(
        train_cfg(
            records,
            tmp_path,
            data={"val_fraction": 0.25},
            schedule={"max_steps": 4, "eval_interval": 2},
            log={"tensorboard": True, "plot": True, "mfu": True},
        )
    )
    assert out["step"] == 4 and len(out["losses"]) == 4 and len(out["eval_losses"]) == 2
    for name in ("config.py", "config.json", "train.log", "metrics.jsonl", "loss_curve.png"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "config.json").read_text())["stage"] == "pretrain"
    assert Image.open(tmp_path / "loss_curve.png").size[0] > 300
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [2, 4]
    for key in ("loss", "lr", "grad_norm", "samples_s", "tokens_s", "mfu", "epoch"):
        assert all(key in r for r in train), key
    assert all(0 < r["mfu"] < 1 and r["tokens_s"] > r["samples_s"] > 0 for r in train)
    log = (tmp_path / "train.log").read_text()
    for step in (
        "== checks passed",
        "== setup: model",
        "== setup: data",
        "== train: steps 1..4",
        "== cleanup",
    ):
        assert step in log, step
    assert "5 held out" in log  # 25% of 20; the held-out and training samples are disjoint
    assert "15 training samples" in log or "training samples (" in log


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Runner.forward
    calls = {"n": 0}

    def poisoned(self: Runner, batch: dict) -> torch.Tensor:
        calls["n"] += 1
        loss = real(self, batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(Runner, "forward", poisoned)
    cfg = train_cfg(records, tmp_path, checkpoint={"interval": 2})
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 .*step_00000002.*--resume"):
        run(cfg)
    done = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert done == ["step_00000002"]


def test_an_infinite_gradient_stops_before_the_update(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Runner.backward
    calls = {"n": 0}

    def overflowing(self: Runner, loss: torch.Tensor, last_micro: bool = True) -> None:
        real(self, loss, last_micro)
        calls["n"] += 1
        if calls["n"] == 3:  # the loss was finite; one gradient overflowed in backward
            p = next(p for p in self.model.parameters() if p.grad is not None)
            p.grad[0] = float("inf")

    monkeypatch.setattr(Runner, "backward", overflowing)
    cfg = train_cfg(records, tmp_path, schedule={"clip_grad": 1.0}, checkpoint={"interval": 2})
    with pytest.raises(
        NonFiniteLossError, match=r"the gradient norm is inf at step 3; stopped before applying"
    ):
        run(cfg)
    weights = load_file(str(tmp_path / "checkpoints" / "step_00000002" / "trainable.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    assert not (tmp_path / "checkpoints" / "step_00000003").exists()


def test_lora_finetune_trains_adapters_and_exports_merged(records: Path, tmp_path: Path) -> None:
    cfg = train_cfg(
        records,
        tmp_path,
        stage="finetune",
        model=tiny_model_cfg(stage="finetune"),
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        optim={"lr": 5e-3},
        schedule={"max_steps": 3},
        checkpoint={"interval": 10, "export": True},
    )
    out = run(cfg)
    assert out["step"] == 3
    names = set(load_file(str(Path(out["last_checkpoint"]) / "trainable.safetensors")))
    llm = {n for n in names if n.startswith("llm.")}
    assert llm and all(".lora_A." in n or ".lora_B." in n for n in llm)
    assert any(n.startswith("connector.") for n in names)

    model = load_model(tmp_path / "model")  # merged: a plain model again
    torch.manual_seed(0)
    base = build(MODELS, tiny_model_cfg(stage="finetune"))
    assert set(model.state_dict()) == set(base.state_dict())
    key = "llm.model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[key], base.state_dict()[key])  # the adapter was merged in


def test_qlora_without_bitsandbytes_says_how_to_install_it(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = train_cfg(
        records,
        tmp_path,
        stage="finetune",
        model=tiny_model_cfg(stage="finetune"),
        lora={"r": 4, "qlora": True},
        schedule={"max_steps": 1},
    )
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(
        ImportError, match=r"lora.qlora=True needs bitsandbytes: pip install 'cambrian\[quant\]'"
    ):
        run(cfg)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_qlora_trains_adapters_over_4bit_layers(records: Path, tmp_path: Path, device: str) -> None:
    pytest.importorskip("bitsandbytes")
    compute = "float32" if device == "cpu" else "bfloat16"

    def train(name: str, **lora: object) -> dict:
        return run(
            train_cfg(
                records,
                tmp_path / name,
                stage="finetune",
                model=tiny_model_cfg(stage="finetune"),
                runner={"type": "single", "device": device},
                lora={"r": 4, "alpha": 8, "dropout": 0.0, "compute_dtype": compute, **lora},
                optim={"lr": 5e-3},
                schedule={"max_steps": 3, "precision": "fp32" if device == "cpu" else "bf16"},
                checkpoint={"interval": 3, "export": True},
            )
        )

    plain, quant = train("lora"), train("qlora", qlora=True)
    log = (tmp_path / "qlora" / "train.log").read_text()
    assert re.search(r"QLoRA: \d+ linear layers of the LLM in 4-bit NF4", log)
    # the adapters start at zero: the first loss is the base model's, through NF4 weights
    assert quant["losses"][0] == pytest.approx(plain["losses"][0], rel=0.05)
    assert quant["losses"][0] != plain["losses"][0]
    assert all(math.isfinite(x) for x in quant["losses"])
    names = set(load_file(str(Path(quant["last_checkpoint"]) / "trainable.safetensors")))
    llm = {n for n in names if n.startswith("llm.")}
    assert llm and all(".lora_A." in n or ".lora_B." in n for n in llm)
    assert any(n.startswith("connector.") for n in names)
    adapter = tmp_path / "qlora" / "lora_adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(saved) == len(llm) and all("lora_" in n for n in saved)
    assert not (tmp_path / "qlora" / "model").exists()  # a 4-bit base is not exported; the adapter is


def _trainable(out: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out["last_checkpoint"]) / "trainable.safetensors"))


def test_a_fresh_run_sets_an_earlier_runs_outputs_aside(records: Path, tmp_path: Path) -> None:
    first = run(train_cfg(records, tmp_path, schedule={"max_steps": 6}, checkpoint={"interval": 2}))
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == [
        "step_00000004",
        "step_00000006",
    ]
    second = run(
        train_cfg(
            records, tmp_path, optim={"lr": 5e-2}, schedule={"max_steps": 2}, checkpoint={"interval": 2}
        )
    )
    # its own step 2 is kept (not pruned in favour of the old steps 4 and 6), and auto-resume finds it
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]
    assert len(losses(tmp_path)) == 2 and losses(tmp_path) == second["losses"]  # metrics of this run only
    (previous,) = (tmp_path / "previous").iterdir()
    assert sorted(p.name for p in (previous / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    assert losses(previous) == first["losses"]
    assert "an earlier run's checkpoints, metrics.jsonl moved to" in (tmp_path / "train.log").read_text()
    resumed = run(
        train_cfg(
            records, tmp_path, optim={"lr": 5e-2}, schedule={"max_steps": 3}, checkpoint={"interval": 2}
        ),
        resume="auto",
    )
    assert resumed["losses"][:2] == second["losses"] and len(list((tmp_path / "previous").iterdir())) == 1


def test_each_run_logs_to_its_own_train_log(records: Path, tmp_path: Path) -> None:
    run(train_cfg(records, tmp_path / "one", schedule={"max_steps": 1}))
    run(train_cfg(records, tmp_path / "two", schedule={"max_steps": 1}))
    assert str(tmp_path / "two") not in (tmp_path / "one" / "train.log").read_text()
    mine = [h for h in logging.getLogger().handlers if str(tmp_path) in getattr(h, "baseFilename", "")]
    assert not mine  # both runs removed their handlers (other tests may call checks() without run())


def test_a_window_whose_samples_were_all_skipped_is_no_update(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", n=8, text_only_every=0)
    (tmp_path / "data" / "images" / "3.png").unlink()  # batch_size 1: that window has nothing to train on
    out = run(train_cfg(data, tmp_path / "w", data={"batch_size": 1}, schedule={"max_steps": 8}))
    assert out["step"] == 8 and len(out["losses"]) == 8 and min(out["losses"]) > 1.0  # no 0.0 loss logged
    rows = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 9))
    for p in (tmp_path / "data" / "images").iterdir():  # nothing usable at all: said, not looped over
        p.unlink()
    with pytest.raises(RuntimeError, match=r"no usable sample in \d+ windows in a row .*missing image"):
        run(train_cfg(data, tmp_path / "w2", data={"batch_size": 1}, schedule={"max_steps": 8}))


def test_grad_accum_equals_one_larger_batch(records: Path, tmp_path: Path) -> None:
    def train(batch: int, accum: int) -> dict:  # one update over the whole epoch: the order cannot matter
        return run(
            train_cfg(
                records,
                tmp_path / f"b{batch}x{accum}",
                data={"batch_size": batch},
                optim={"type": "SGD", "lr": 0.5},
                schedule={"max_steps": 1, "grad_accum": accum, "clip_grad": None},
                checkpoint={"interval": 100},
            )
        )

    one, accumulated = train(16, 1), train(4, 4)  # the 16 image samples of the pretrain stage
    assert accumulated["losses"] == pytest.approx(one["losses"], rel=1e-5)
    a, b = _trainable(one), _trainable(accumulated)
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    lone = _trainable(train(4, 1))  # a quarter of the data moves the weights elsewhere
    assert any(not torch.allclose(lone[n], a[n], rtol=1e-3, atol=1e-5) for n in a)


def test_an_epoch_not_a_multiple_of_grad_accum_ends_with_a_shorter_update(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Runner.forward
    seen: list[list[int]] = []

    def counting(self: Runner, batch: dict) -> torch.Tensor:
        seen.append([int(i) for i in batch["indices"]])
        return real(self, batch)

    monkeypatch.setattr(Runner, "forward", counting)
    cfg = train_cfg(
        records,
        tmp_path,
        data={"batch_size": 4},  # the 16 image samples: 4 micro-batches, windows of 3 and 1
        schedule={"max_steps": -1, "epochs": 2, "grad_accum": 3},
        checkpoint={"interval": 100},
    )
    out = run(cfg)
    assert out["step"] == 4 and len(seen) == 8
    first, second = (sorted(i for b in seen[k : k + 4] for i in b) for k in (0, 4))
    assert first == second and len(set(first)) == 16  # every sample once per epoch, none left out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["split"] == "train"] == [0.75, 1.0, 1.75, 2.0]
    log = (tmp_path / "train.log").read_text()
    assert (
        "not a multiple of schedule.grad_accum=3: the last update of every epoch accumulates 1 of them" in log
    )


def test_a_held_out_record_skipped_counts_once_however_often_the_run_evaluates(
    records: Path, tmp_path: Path
) -> None:
    val = tmp_path / "val.jsonl"
    broken = {"id": "bad", "image": "images/nope.png"}
    broken["conversations"] = [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]
    val.write_text(records.read_text().splitlines()[0] + "\n" + json.dumps(broken) + "\n")
    (tmp_path / "images").symlink_to(records.parent / "images")
    out = run(
        train_cfg(
            records,
            tmp_path / "w",
            data={"val": str(val)},
            schedule={"max_steps": 4, "eval_interval": 1},
            checkpoint={"interval": 100},
        )
    )
    assert len(out["eval_losses"]) == 4 and out["skipped"] == {"missing image": 1}


def test_clip_grad_bounds_the_update(records: Path, tmp_path: Path) -> None:
    def train(lr: float, clip: float | None, name: str) -> dict:
        return run(
            train_cfg(
                records,
                tmp_path / name,
                optim={"type": "SGD", "lr": lr},
                schedule={"max_steps": 1, "clip_grad": clip},
                checkpoint={"interval": 100},
            )
        )

    start = _trainable(train(0.0, None, "start"))  # lr 0: the initial weights
    clipped = train(1.0, 1e-3, "clipped")
    rows = [json.loads(line) for line in (tmp_path / "clipped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_norm"] > 1e-2 for r in rows if r["split"] == "train"] == [True]  # logged before clipping
    moved = _trainable(clipped)
    step = torch.sqrt(sum(((moved[n] - start[n]) ** 2).sum() for n in start))
    assert float(step) == pytest.approx(1e-3, rel=1e-3)  # SGD, lr 1: the update is the clipped gradient


def test_packing_gives_the_unpacked_loss(records: Path, tmp_path: Path) -> None:
    from mmengine.config import Config

    from cambrian_core.train.collate import Collator
    from cambrian_core.train.recipe import TrainRecipe

    recipe = TrainRecipe(Config(train_cfg(records, tmp_path, data={"batch_size": 4})), dry_run=True)
    recipe.checks()
    recipe.setup()
    items = [recipe.train_set[i] for i in range(4)]
    model = recipe.model.eval()
    assert model.llm.model.config._attn_implementation == "cambrian_sdpa"  # sdpa, per segment when packed
    keys = ("input_ids", "attention_mask", "labels", "pixel_values", "image_sizes", "position_ids")
    longest = max(int(s["length"]) for s in items)
    total = sum(int(s["length"]) for s in items)
    result = {}
    # unpacked; one padding-free row; rows of at most `longest` tokens (several rows, right padding)
    for name, packing, capacity in (
        ("padded", False, 512),
        ("one row", True, total),
        ("rows", True, longest),
    ):
        batch = Collator(model.llm.tokenizer.pad_token_id, packing=packing, max_length=capacity)(items)
        if name == "rows":
            assert batch["input_ids"].shape[0] > 1 and (batch["attention_mask"] == 0).any()
        for loss_only in (False, True):
            with torch.no_grad():
                out = model(**{k: batch[k] for k in keys if k in batch}, use_cache=False, loss_only=loss_only)
            assert (out.logits is None) == loss_only
            result[name, loss_only] = float(out.loss)
    for value in result.values():
        assert value == pytest.approx(result["padded", False], rel=1e-5)


def test_dry_run_check_pixels_names_truncated_image_data(
    records: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(records.parent, data)
    png = data / "images" / "2.png"
    png.write_bytes(png.read_bytes()[:120])  # the header reads, the pixel data is cut short
    cfg = dump(train_cfg(data / records.name, tmp_path / "w"), tmp_path / "tiny.py")
    with caplog.at_level(logging.INFO):
        assert main(["train", str(cfg), "--dry-run"]) == 0
    said = [r.getMessage() for r in caplog.records if "dry run:" in r.getMessage()]
    assert any(re.fullmatch(r"== dry run: all \d+ training samples pass the data checks", m) for m in said)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["train", str(cfg), "--dry-run", "--check-pixels"]) == 0
    said = [r.getMessage() for r in caplog.records if "dry run:" in r.getMessage()]
    line = next(
        n for n, x in enumerate((data / records.name).read_text().splitlines(), 1) if "images/2.png" in x
    )
    assert any(
        "1 of" in m and f"unreadable image x1 ({data / records.name} line {line}: " in m for m in said
    ), said
    capsys.readouterr()
    assert main(["train", str(cfg), "--check-pixels"]) == 2
    assert "--check-pixels goes with --dry-run" in capsys.readouterr().err


def test_cli_dry_run_errors_and_launchers(
    records: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = dump(train_cfg(records, tmp_path / "w"), tmp_path / "tiny.py")
    assert main(["train", str(cfg), "--dry-run", "--cfg-options", "data.batch_size=4"]) == 0
    assert "done: 0 steps" in capsys.readouterr().out
    assert not (tmp_path / "w" / "checkpoints").exists()

    # the dry run checks every sample (no pixels decoded) and names what training would skip
    lines = records.read_text().splitlines()
    lines[2] = lines[2].replace("images/2.png", "images/gone.png")
    lines[6] = lines[6][:30]
    flawed = tmp_path / "flawed.jsonl"
    flawed.write_text("\n".join(lines) + "\n")
    (tmp_path / "images").symlink_to(records.parent / "images")
    with caplog.at_level(logging.INFO):
        assert main(["train", str(cfg), "--dry-run", "--cfg-options", f"data.train={flawed}"]) == 0
    said = [r.getMessage() for r in caplog.records if "dry run:" in r.getMessage()]
    assert any(
        m.startswith("== dry run: 2 of 16 training samples would be skipped: ")  # 4 text-only left out
        and f"missing image x1 ({flawed} line 3: " in m
        and f"malformed line x1 ({flawed} line 7: " in m
        for m in said
    ), said
    caplog.clear()
    assert main(["train", str(cfg), "--dry-run", "--cfg-options", "data.val_fraction=0.25"]) == 0
    said = [r.getMessage() for r in caplog.records if "dry run:" in r.getMessage()]
    assert any(re.fullmatch(r"== dry run: all 1\d training samples pass the data checks", m) for m in said)
    assert "== dry run: all 5 held-out samples pass the data checks" in said
    capsys.readouterr()

    assert main(["train", str(cfg), "--dry-run", "--nproc", "2"]) == 2  # would silently run one process
    assert (
        "--nproc 2 starts processes only with a launcher: add --launcher torchrun" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as stop:
        main(["train", str(cfg), "--launcher", "torchrun", "--nproc", "0"])
    assert stop.value.code == 2 and "--nproc: must be >= 1, got 0" in capsys.readouterr().err

    missing = dump(train_cfg(tmp_path / "nope.jsonl", tmp_path / "w2"), tmp_path / "bad.py")
    assert main(["train", str(missing)]) == 2
    assert "data.train: file not found" in capsys.readouterr().err
    assert main(["train", str(cfg), "--dry-run", "--resume", str(tmp_path / "no_such_ckpt")]) == 2
    assert "--resume" in capsys.readouterr().err  # the checkpoint problem as one line, no traceback
    (tmp_path / "empty.jsonl").write_text("")
    assert (
        main(["train", str(cfg), "--dry-run", "--cfg-options", f"data.train={tmp_path / 'empty.jsonl'}"]) == 2
    )
    err = capsys.readouterr().err
    assert "data.train: " in err and "0 samples cannot fill one global batch" in err
    with pytest.raises(
        ConfigError, match=r"2 samples cannot fill .*\(20 records; data.val_fraction=0.9 holds out 18\)"
    ):
        run(train_cfg(records, tmp_path / "w4", data={"batch_size": 4, "val_fraction": 0.9}))
    with pytest.raises(ConfigError, match=r"schedule\.grad_accum: must be >= 1, got 0"):
        run(train_cfg(records, tmp_path / "w3", schedule={"grad_accum": 0}))
    # found in setup, said as config problems too (exit 2, no traceback)
    with pytest.raises(
        ConfigError, match=r"schedule\.grad_accum: 50 but one epoch has \d+ micro-batches per rank"
    ):
        run(train_cfg(records, tmp_path / "w7", schedule={"grad_accum": 50}))
    # settings that would do nothing are named, not ignored
    with pytest.raises(ConfigError) as err:
        run(train_cfg(records, tmp_path / "w6", schedule={"eval_interval": 2, "eval_max_batches": 3}))
    assert "schedule.eval_interval: 2 but this run evaluates nothing: set data.val" in str(err.value)
    assert "schedule.eval_max_batches: 3 limits a held-out loss this run does not compute" in str(err.value)

    args = argparse.Namespace(
        config="c.py",
        cfg_options=["a=1"],
        work_dir=None,
        resume="auto",
        dry_run=False,
        launcher="torchrun",
        nproc=4,
    )
    cmd = launch_command(args)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert cmd[5:] == ["-m", "cambrian_core.train", "c.py", "--cfg-options", "a=1", "--resume", "auto"]
    args.launcher = "deepspeed"
    cmd = launch_command(args)
    assert cmd[1:7] == [
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus=4",
        "--no_local_rank",
        "--module",
        "cambrian_core.train",
    ]


def test_xla_runner_without_torch_xla_says_how_to_install() -> None:
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torch_xla is installed in this environment")
    from cambrian_core.train.runners.xla import XLARunner

    with pytest.raises(ImportError, match=r"requirements-xla\.txt.*PJRT_DEVICE"):
        XLARunner().setup()


def test_dataset_ships_to_workers_without_tower_weights(records: Path, tmp_path: Path) -> None:
    import pickle

    from mmengine.config import Config

    from cambrian_core.train.recipe import TrainRecipe

    recipe = TrainRecipe(Config(train_cfg(records, tmp_path, data={"num_workers": 2})), dry_run=True)
    recipe.checks()
    recipe.setup()
    blob = pickle.dumps(recipe.train_set)  # what a spawned DataLoader worker receives
    tower_bytes = sum(p.numel() * p.element_size() for t in recipe.model.towers for p in t.parameters())
    assert len(blob) < tower_bytes / 2
    clone = pickle.loads(blob)
    a, b = clone[0], recipe.train_set[0]
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(
        a["pixel_values"][1], b["pixel_values"][1]
    )
    batches = list(recipe.loader)  # two worker processes, per-tower transforms computed there
    assert sum(b["num_samples"] for b in batches) == len(recipe.sampler) * 2


@pytest.mark.gpu
def test_single_runner_on_cuda_in_bf16(records: Path, tmp_path: Path) -> None:
    over = {"schedule": {"max_steps": 3, "precision": "bf16"}}
    gpu = run(train_cfg(records, tmp_path / "gpu", runner={"type": "single", "device": "cuda"}, **over))
    cpu = run(train_cfg(records, tmp_path / "cpu", **over))
    assert gpu["losses"] == pytest.approx(cpu["losses"], rel=2e-2)
    assert "rank 0/1 on cuda:0" in (tmp_path / "gpu" / "train.log").read_text()


@pytest.mark.gpu
def test_an_fp16_update_the_scaler_skips_leaves_the_warmup_on_cuda(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Runner.backward
    calls = {"n": 0}

    def overflowing_first(self: Runner, loss: torch.Tensor, last_micro: bool = True) -> None:
        calls["n"] += 1
        real(self, loss * 1e30 if calls["n"] == 1 else loss, last_micro)  # fp16 overflow in update 1 only

    monkeypatch.setattr(Runner, "backward", overflowing_first)
    cfg = train_cfg(
        records,
        tmp_path,
        runner={"type": "single", "device": "cuda"},
        schedule={"max_steps": 4, "warmup_ratio": 0.5, "precision": "fp16"},
        checkpoint={"interval": 100},
    )
    run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert not math.isfinite(train[0]["grad_norm"]) and math.isfinite(train[1]["grad_norm"])
    # warm-up of 2 updates: the skipped update 1 used none of it, so update 2 runs at the first warm-up lr
    assert train[1]["lr"] == pytest.approx(train[0]["lr"]) == pytest.approx(5e-4)


def test_gradient_checkpointing_and_bf16_autocast(records: Path, tmp_path: Path) -> None:
    over = {"stage": "finetune", "model": tiny_model_cfg(stage="finetune"), "schedule": {"max_steps": 2}}
    plain = run(train_cfg(records, tmp_path / "plain", **over))
    ckpt = run(
        train_cfg(
            records, tmp_path / "gc", **{**over, "schedule": {"max_steps": 2, "gradient_checkpointing": True}}
        )
    )
    assert ckpt["losses"] == pytest.approx(
        plain["losses"], rel=1e-5
    )  # recomputation changes memory, not maths
    bf16 = run(
        train_cfg(records, tmp_path / "bf16", **{**over, "schedule": {"max_steps": 2, "precision": "bf16"}})
    )
    assert bf16["losses"] == pytest.approx(plain["losses"], rel=2e-2) and bf16["losses"] != plain["losses"]


def test_compile_connector_is_applied_before_training(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cambrian_core.model.cambrian import CambrianModel

    calls = []  # what compiling does to the maths: test_model's compiled-connector test
    monkeypatch.setattr(CambrianModel, "compile_connector", lambda self, **kw: calls.append(self.training))
    run(train_cfg(records, tmp_path, schedule={"max_steps": 1, "compile_connector": True}))
    assert len(calls) == 1
    assert "connector compiled with torch.compile" in (tmp_path / "train.log").read_text()
    with pytest.raises(
        ConfigError, match=r"schedule\.compile_connector: is supported with the single and fsdp"
    ):
        run(
            train_cfg(
                records, tmp_path / "ds", runner={"type": "deepspeed"}, schedule={"compile_connector": True}
            )
        )


def test_eval_section_scores_a_vqa_dev_split_during_training(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cambrian_core.eval.hook import EvalHook

    modes: list[bool] = []
    real = EvalHook.__call__

    def spy(self, model, step, logger=None):  # the answers are generated without dropout
        modes.append(model.training)
        return real(self, model, step, logger)

    monkeypatch.setattr(EvalHook, "__call__", spy)
    trained = []
    real_forward = Runner.forward
    monkeypatch.setattr(
        Runner, "forward", lambda self, b: trained.append(self.model.training) or real_forward(self, b)
    )
    out = run(
        train_cfg(
            records,
            tmp_path,
            schedule={"max_steps": 4, "eval_interval": 2},
            eval={
                "benchmark": "jsonl",
                "data": str(records),
                "limit": 3,
                "max_new_tokens": 4,
                "batch_size": 2,
            },
        )
    )
    assert out["step"] == 4
    for step in (2, 4):  # every eval_interval, no held-out split needed
        results = json.loads((tmp_path / "vqa_eval" / f"step-{step}" / "results.json").read_text())
        assert results["metrics"]["open_f1"]["n"] == 3  # the first `limit` items, scored
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vqa = [r for r in rows if r["split"] == "vqa"]
    assert [r["step"] for r in vqa] == [2, 4]
    assert {"jsonl/open_f1", "jsonl/open_recall", "jsonl/llava_med_open_recall"} <= set(vqa[0])
    assert all(0.0 <= r["jsonl/open_f1"] <= 1.0 and r["jsonl/failed"] == 0.0 for r in vqa)
    assert modes == [False, False] and trained == [True] * 4  # eval mode for the answers, train mode after


def test_eval_section_rejects_unknown_keys(records: Path, tmp_path: Path) -> None:
    from cambrian_core.config import ConfigError

    with pytest.raises(ConfigError, match=r"eval\.limt: unknown key; did you mean `limit`\?"):
        run(train_cfg(records, tmp_path, eval={"benchmark": "jsonl", "data": str(records), "limt": 3}))
    # what the first evaluation (hours later) would trip on is found before training
    ok = {"benchmark": "slake", "data": str(records), "split": "Val"}  # as the loader reads it: validate
    from mmengine.config import Config

    from cambrian_core.train.recipe import TrainRecipe

    recipe = TrainRecipe(Config(train_cfg(records, tmp_path, eval=ok)))
    assert [p.key for p in recipe._eval_section_problems()] == []
    bad = {"benchmark": "slake", "data": str(tmp_path / "nope"), "split": "holdout"}
    with pytest.raises(ConfigError) as err:
        run(train_cfg(records, tmp_path, eval={**bad, "options": {"lang": "en"}, "metrics": ["closed_acc"]}))
    said = str(err.value)
    assert (
        "eval.options: slake takes no option(s) ['lang']; its options: none (slake is the English rows"
        in said
    )
    assert "eval.split: slake has no split 'holdout'; splits: train, validate, test" in said
    assert f"eval.data: {tmp_path / 'nope'} does not exist" in said
    assert (
        "eval.metrics: Unknown metric type `closed_acc`" in said and "Did you mean `closed_accuracy`?" in said
    )
    with pytest.raises(ConfigError, match=r"eval\.benchmark: unknown benchmark 'slakes'"):
        run(train_cfg(records, tmp_path, eval={"benchmark": "slakes", "data": str(records)}))


def test_a_failing_final_evaluation_keeps_the_trained_weights(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cambrian_core.train.recipe import TrainRecipe

    def broken(self: TrainRecipe) -> None:
        raise RuntimeError("the benchmark folder went away")

    monkeypatch.setattr(TrainRecipe, "_evaluate_vqa", broken)
    cfg = train_cfg(
        records,
        tmp_path,
        schedule={"max_steps": 3},
        checkpoint={"interval": 100},
        eval={"benchmark": "jsonl", "data": str(records), "limit": 2},
    )
    with pytest.raises(RuntimeError, match="went away"):
        run(cfg)
    assert (tmp_path / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    monkeypatch.undo()
    assert run(cfg, resume="auto")["step"] == 3  # the fixed run finishes: evaluation and export


def test_flop_count_follows_what_the_step_computes() -> None:
    from cambrian_core.registry import MODELS, build
    from cambrian_core.train.metrics import FlopsCounter

    torch.manual_seed(0)
    model = build(MODELS, tiny_model_cfg(stage="finetune"))
    counter = FlopsCounter(model, image_sizes_probe=False)
    head = model.llm.model.get_output_embeddings().weight.numel()
    assert counter.head_params == head > 0
    full = counter.step_flops(100, [60, 40], 0)
    targets_only = counter.step_flops(100, [60, 40], 0, head_tokens=10)
    assert full - targets_only == pytest.approx(2 * head * 90 * 3)  # trainable LLM: forward + 2 backward
    # samples packed in one row attend within themselves: 60^2 + 40^2, not 100^2
    assert counter.step_flops(100, [100], 0) > full


class _FakeWandb(types.ModuleType):
    """Stands in for the ``wandb`` package (a network service): records what the recipe sends it."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.init_kwargs: dict = {}
        self.logged: list[tuple[int, dict]] = []
        self.finished = 0

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, dict(values)))

    def finish(self) -> None:
        self.finished += 1


def test_wandb_receives_the_same_metrics_as_metrics_jsonl(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = train_cfg(
        records,
        tmp_path,
        data={"val_fraction": 0.25},
        schedule={"max_steps": 3, "eval_interval": 3},
        log={"wandb": {"project": "cambrian-test", "mode": "offline"}},
    )
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run(cfg)
    kw = fake.init_kwargs
    assert (kw["project"], kw["mode"], kw["dir"]) == ("cambrian-test", "offline", str(tmp_path))
    assert kw["config"]["stage"] == "pretrain"
    assert fake.finished == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    want = [
        (r["step"], {f"{r['split']}/{k}": v for k, v in r.items() if k not in ("step", "split")})
        for r in rows
    ]
    assert fake.logged == want
    assert [s for s, v in fake.logged if "train/loss" in v] == [1, 2, 3]
    assert [s for s, v in fake.logged if "eval/loss" in v] == [3]


def test_wandb_configured_but_not_installed_says_how_to_fix(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = train_cfg(records, tmp_path, schedule={"max_steps": 1}, log={"wandb": {"project": "p"}})
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match=r"log\.wandb is set but wandb is not installed: pip install wandb"):
        run(cfg)


def test_compiling_sva_on_a_torch_with_wrong_compiled_gradients_is_a_config_error(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    with pytest.raises(
        ConfigError, match=r"schedule\.compile_connector: torch\.compile of the SVA connector returns wrong"
    ):
        run(
            train_cfg(
                records,
                tmp_path,
                model=tiny_model_cfg(connector="sva"),
                schedule={"max_steps": 1, "compile_connector": True},
            )
        )
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before any training


def test_load_from_takes_a_registered_checkpoint_name(records: Path, tmp_path: Path) -> None:
    from cambrian_core.model.checkpoints import NamedCheckpoint
    from cambrian_core.registry import CHECKPOINTS

    base = build(MODELS, tiny_model_cfg())
    folder = base.save_pretrained(str(tmp_path / "saved"))
    name = "test-load-from-name"
    CHECKPOINTS.register_module(
        name=name, module=lambda: NamedCheckpoint(name=name, folder=folder), force=True
    )
    try:
        run(train_cfg(records, tmp_path / "w", load_from=name, schedule={"max_steps": 1}))
        log = (tmp_path / "w" / "train.log").read_text()
        assert f"tensors from {folder}" in log
        with pytest.raises(
            ConfigError, match=r"load_from: no-such-name is neither a folder nor a registered"
        ):
            run(train_cfg(records, tmp_path / "w2", load_from="no-such-name", schedule={"max_steps": 1}))
    finally:
        CHECKPOINTS._module_dict.pop(name, None)


def test_a_rank_whose_held_out_share_was_skipped_runs_the_same_modality_as_the_others() -> None:
    """Two ranks in lock-step over a held-out split of 4 image and 2 text samples, text sample 5 unusable: the
    rank left without a sample runs a usable sample of the *same* modality (a sharded runner gathers the
    towers' weights only for image batches) and does not count it; every usable sample is counted once."""
    import types

    import numpy as np

    from cambrian_core.train.data import Skipped
    from cambrian_core.train.recipe import TrainRecipe

    has_image = np.array([True] * 4 + [False] * 2)
    unusable = {5}

    class ValSet:
        lengths = np.full(6, 10)

        def __init__(self) -> None:
            self.has_image = has_image

        def has_image_at(self, i: int) -> bool:
            return bool(has_image[i])

        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int):
            return Skipped(i, "image") if i in unusable else {"index": i}

    def collate(items):
        ok = [x for x in items if not isinstance(x, Skipped)]
        batch = {"skipped": [x for x in items if isinstance(x, Skipped)], "num_samples": len(ok)}
        if ok:
            idx = [x["index"] for x in ok]
            batch.update(indices=idx, image=bool(has_image[idx[0]]), num_target_tokens=len(idx))
        return batch

    def run(rank: int) -> tuple[list, float]:
        fed = []

        class Runner:
            world_size, is_main = 2, rank == 0

            def __init__(self) -> None:
                self.rank = rank
                self.model = types.SimpleNamespace(eval=lambda: None, train=lambda: None)

            def forward(self, batch):
                fed.append(("image" if batch["image"] else "text", batch["indices"]))
                return torch.tensor(float(sum(batch["indices"])))

            def all_reduce(self, t, op="sum"):
                return t

        logged = {}
        stub = types.SimpleNamespace(
            runner=Runner(),
            val_set=ValSet(),
            collate=collate,
            data=types.SimpleNamespace(batch_size=1),
            sched=types.SimpleNamespace(eval_max_batches=0),
            skips=types.SimpleNamespace(add=lambda s: None),
            _loader=lambda dataset, plan: (collate([dataset[i] for i in idx]) for idx in plan),
            step=0,
            last_eval_step=-1,
            history=[],
            logger=types.SimpleNamespace(
                log=lambda step, values, split: logged.update(values), message=print
            ),
            _evaluate_vqa=lambda: None,
        )
        stub._stand_in = types.MethodType(TrainRecipe._stand_in, stub)
        TrainRecipe.evaluate(stub)
        return fed, logged["loss"]

    (fed0, loss0), (fed1, loss1) = run(0), run(1)
    assert [m for m, _ in fed0] == [m for m, _ in fed1] == ["image", "image", "text"], (fed0, fed1)
    assert fed1[2] == (
        "text",
        [4],
    )  # rank 1's text share (sample 5) was unusable: sample 4 stands in, uncounted
    # each rank's counted samples (all_reduce is the identity here): rank 0 has 0, 2, 4; rank 1 has 1, 3
    assert loss0 == pytest.approx((0 + 2 + 4) / 3) and loss1 == pytest.approx((1 + 3) / 2)
