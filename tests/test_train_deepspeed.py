"""DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload on CPU (gloo, no op compilation) train like one process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _train_fixtures import (
    dump,
    launch,
    losses,
    run,
    subprocess_env,
    tiny_model_cfg,
    train_cfg,
    write_dataset,
)

from cambrian_core.model.io import load_weights
from cambrian_core.train.runners.deepspeed import fill_ds_config, resolve_config_path

pytestmark = pytest.mark.distributed
STAGES = ("zero2", "zero3", "zero3_offload")


def test_zero_stages_match_single_process_and_resume(tmp_path: Path) -> None:
    records = write_dataset(tmp_path / "data", n=16)
    over = {"schedule": {"max_steps": 4}, "checkpoint": {"interval": 2, "export": False}}
    vqa = {"eval": {"benchmark": "jsonl", "data": str(records), "limit": 3, "max_new_tokens": 4}}
    single = run(train_cfg(records, tmp_path / "single", data={"batch_size": 4}, **over, **vqa))
    configs = []
    for name in STAGES:
        runner = {"type": "deepspeed", "device": "cpu", "config": f"cambrian::_base_/runtime/{name}.json"}
        extra = {"checkpoint": {"interval": 2, "export": name == "zero3"}, **(vqa if name == "zero3" else {})}
        cfg = train_cfg(records, tmp_path / name, runner=runner, data={"batch_size": 2}, **{**over, **extra})
        configs.append(str(dump(cfg, tmp_path / f"{name}.py")))
    # SVA reads child modules' weights in its own forward (folded LayerNorms, split proj_in, custom autograd
    # functions): under ZeRO-3 with every parameter partitioned (no persistence threshold) it trains as one process
    sva = {**over, "model": tiny_model_cfg(connector="sva")}
    single_sva = run(train_cfg(records, tmp_path / "single_sva", data={"batch_size": 4}, **sva))
    ds_cfg = json.loads(resolve_config_path("cambrian::_base_/runtime/zero3.json").read_text())
    ds_cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3_all.json").write_text(json.dumps(ds_cfg))
    runner = {"type": "deepspeed", "device": "cpu", "config": str(tmp_path / "zero3_all.json")}
    cfg = train_cfg(records, tmp_path / "zero3_sva", runner=runner, data={"batch_size": 2}, **sva)
    configs.append(str(dump(cfg, tmp_path / "zero3_sva.py")))
    # 3 micro-batches per rank and epoch with grad_accum 2: every epoch ends with a one-micro-batch update
    accum = {"schedule": {"max_steps": 4, "grad_accum": 2}, "checkpoint": {"interval": 10, "export": False}}
    single_accum = run(train_cfg(records, tmp_path / "single_accum", data={"batch_size": 4}, **accum))
    runner = {"type": "deepspeed", "device": "cpu", "config": "cambrian::_base_/runtime/zero2.json"}
    cfg = train_cfg(records, tmp_path / "zero2_accum", runner=runner, data={"batch_size": 2}, **accum)
    configs.append(str(dump(cfg, tmp_path / "zero2_accum.py")))
    cfg = train_cfg(records, tmp_path / "zero2_nan", runner=runner, data={"batch_size": 2}, **over)
    nan_cfg = str(dump(cfg, tmp_path / "zero2_nan.py"))
    # one launch runs them all (and a resume of the offload run to 6 steps): DeepSpeed start-up is paid once
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(
            f"""
            import sys
            from cambrian_core.cli import main
            for cfg in {configs!r}:
                assert main(["train", cfg]) == 0
            assert main(["train", {configs[2]!r}, "--resume", "auto", "--cfg-options", "schedule.max_steps=6"]) == 0
            # a finite loss whose gradient is NaN at step 3: DeepSpeed sees the norm only inside its step
            from cambrian_core.train.metrics import NonFiniteLossError
            from cambrian_core.train.runners.deepspeed import DeepSpeedRunner
            real, calls = DeepSpeedRunner.forward, [0]
            def poisoned(self, batch):
                loss = real(self, batch)
                calls[0] += 1
                if calls[0] == 3:
                    p = next(p for p in self.engine.module.parameters() if p.requires_grad)
                    loss = loss + (p - p.detach()).abs().sqrt().sum()  # adds 0; its gradient is 0 * inf
                return loss
            DeepSpeedRunner.forward = poisoned
            try:
                main(["train", {nan_cfg!r}])
            except NonFiniteLossError as exc:
                print("STOPPED:", exc, file=sys.stderr)
            """
        )
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Compiling" not in proc.stderr and "ninja" not in proc.stderr  # no JIT op builds on CPU

    for name in STAGES:
        got = losses(tmp_path / name)[:4]
        assert got == pytest.approx(single["losses"], rel=1e-5), name
    assert losses(tmp_path / "zero3_sva") == pytest.approx(single_sva["losses"], rel=1e-5)
    assert losses(tmp_path / "zero2_accum") == pytest.approx(single_accum["losses"], rel=1e-5)
    assert "the last update of every epoch accumulates 1 of them" in proc.stderr
    # (DeepSpeed reports a NaN gradient's norm as inf)
    stopped = r"STOPPED: the gradient norm is (nan|inf) at step 3; this runner computes it inside its update"
    # both ranks stop (their stderr lines may interleave)
    assert proc.stderr.count("STOPPED:") == 2 and re.search(stopped, proc.stderr), proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "zero2_nan" / "checkpoints").iterdir()) == ["step_00000002"]
    resumed = losses(tmp_path / "zero3_offload")
    assert len(resumed) == 6 and "resuming from" in proc.stderr and "step_00000004" in proc.stderr
    state = torch.load(
        tmp_path / "zero3_offload" / "checkpoints" / "step_00000006" / "state.pt", weights_only=True
    )
    assert state["step"] == 6
    exported = load_weights(tmp_path / "zero3" / "model")  # gathered from ZeRO-3 partitions
    trained = load_weights_from_checkpoint(tmp_path / "zero3" / "checkpoints" / "step_00000004")
    for key, value in trained.items():
        torch.testing.assert_close(exported[key], value)
    # the final dev-split VQA ran on rank 0 with the model gathered from the ZeRO-3 partitions
    scores = [
        json.loads((tmp_path / d / "vqa_eval" / "step-4" / "results.json").read_text())["metrics"]
        for d in ("single", "zero3")
    ]
    assert scores[0]["open_f1"]["n"] == 3 and scores[1] == scores[0]


def test_the_deepspeed_launcher_starts_the_recipe(tmp_path: Path) -> None:
    records = write_dataset(tmp_path / "data", n=16)
    over = {"schedule": {"max_steps": 2}, "checkpoint": {"interval": 10, "export": False}}
    single = run(train_cfg(records, tmp_path / "single", data={"batch_size": 4}, **over))
    runner = {"type": "deepspeed", "device": "cpu", "config": "cambrian::_base_/runtime/zero2.json"}
    cfg = dump(
        train_cfg(records, tmp_path / "ds", runner=runner, data={"batch_size": 2}, **over), tmp_path / "c.py"
    )
    proc = launch(cfg, "deepspeed", 2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "-m deepspeed.launcher.runner --num_gpus=2 --no_local_rank --module cambrian_core.train"
        in proc.stderr
    )
    assert "rank 0/2" in proc.stderr and "done: 2 steps" in proc.stdout
    assert losses(tmp_path / "ds") == pytest.approx(single["losses"], rel=1e-5)


@pytest.mark.gpu
def test_zero_stages_on_one_gpu_with_nccl_train_like_the_single_runner(tmp_path: Path) -> None:
    records = write_dataset(tmp_path / "data", n=16)
    over = {"schedule": {"max_steps": 3}, "checkpoint": {"interval": 3, "export": False}}
    gpu = {"type": "single", "device": "cuda"}
    single = run(train_cfg(records, tmp_path / "single", runner=gpu, data={"batch_size": 4}, **over))
    bf16 = {**over, "schedule": {"max_steps": 3, "precision": "bf16"}}
    single_bf16 = run(
        train_cfg(records, tmp_path / "single_bf16", runner=gpu, data={"batch_size": 4}, **bf16)
    )
    runs = {name: over for name in STAGES} | {"zero3_bf16": bf16}
    configs = []
    for name, sched in runs.items():
        json_name = name.removesuffix("_bf16")
        runner = {
            "type": "deepspeed",
            "device": "cuda",
            "config": f"cambrian::_base_/runtime/{json_name}.json",
        }
        cfg = train_cfg(records, tmp_path / name, runner=runner, data={"batch_size": 4}, **sched)
        configs.append(str(dump(cfg, tmp_path / f"{name}.py")))
    driver = tmp_path / "driver.py"
    driver.write_text(
        f"from cambrian_core.cli import main\nfor cfg in {configs!r}:\n    assert main(['train', cfg]) == 0\n"
    )
    env = {k: v for k, v in subprocess_env().items() if k != "DS_ACCELERATOR"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(driver)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/1 on cuda:0" in proc.stderr
    for name in STAGES:
        assert losses(tmp_path / name) == pytest.approx(single["losses"], rel=1e-4), name
    # DeepSpeed's bf16 keeps bf16 weights with fp32 master copies; the single runner autocasts fp32 weights
    assert losses(tmp_path / "zero3_bf16") == pytest.approx(single_bf16["losses"], rel=3e-2)


def load_weights_from_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "trainable.safetensors"))


def test_ds_config_filling() -> None:
    import json

    raw = json.loads(resolve_config_path("cambrian::_base_/runtime/zero3_offload.json").read_text())
    cfg = fill_ds_config(raw, micro_batch_size=4, grad_accum=6, world_size=8, precision="bf16", clip_grad=1.0)
    assert cfg["train_batch_size"] == 192 and cfg["gradient_accumulation_steps"] == 6
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["gradient_clipping"] == 1.0 and cfg["zero_force_ds_cpu_optimizer"] is False
    assert "stage3_prefetch_bucket_size" not in cfg["zero_optimization"]  # "auto" -> DeepSpeed's default
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ValueError, match="declares `optimizer`; cambrian builds the optimiser"):
        fill_ds_config({**raw, "optimizer": {"type": "AdamW"}}, 1, 1, 1, "fp32", None)
    with pytest.raises(ValueError, match=r"keys \['wall_clock_breakdown'\] are 'auto'"):
        fill_ds_config({**raw, "wall_clock_breakdown": "auto"}, 1, 1, 1, "fp32", None)
    # a concrete value equal to the run's is fine; another one is named with the run's setting
    same = {**raw, "gradient_clipping": 1.0, "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 4}
    assert fill_ds_config(same, 4, 6, 8, "bf16", 1.0)["gradient_clipping"] == 1.0
    clash = {**raw, "gradient_clipping": 1.0, "gradient_accumulation_steps": 4, "bf16": {"enabled": True}}
    with pytest.raises(ValueError) as err:
        fill_ds_config(clash, 2, 1, 1, "fp32", None)
    assert str(err.value) == (
        "the DeepSpeed config sets values the run sets itself: gradient_accumulation_steps = 4 (the run's "
        "schedule.grad_accum gives 1); gradient_clipping = 1.0 (the run's schedule.clip_grad (None = 0.0) gives "
        "0.0); bf16.enabled = True (the run's schedule.precision is 'fp32'); write \"auto\" there (cambrian fills "
        "it in) or change the run's setting"
    )
    # through the runner it is a config error (the CLI's exit 2, no traceback), before DeepSpeed starts
    from cambrian_core.config import ConfigError
    from cambrian_core.train.runners.deepspeed import DeepSpeedRunner

    runner = DeepSpeedRunner(config={**raw, "gradient_clipping": 1.0}, device="cpu")
    with pytest.raises(
        ConfigError, match=r"runner\.config: the inline DeepSpeed config: .*gradient_clipping = 1\.0"
    ):
        runner.prepare(torch.nn.Linear(2, 2), list, list, "fp32", None, 1, 2)
