"""FSDP2 on CPU: two gloo processes under torchrun train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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

pytestmark = pytest.mark.distributed


def test_two_process_fsdp_matches_single_process(tmp_path: Path) -> None:
    records = write_dataset(tmp_path / "data", n=20)  # 5 held out: the last global batch of 4 is padded
    vqa = {"benchmark": "jsonl", "data": str(records), "limit": 3, "max_new_tokens": 4, "batch_size": 3}
    over = {
        "schedule": {"max_steps": 4, "eval_interval": 2},
        "checkpoint": {"interval": 2, "export": True},
        "eval": vqa,
    }
    single = run(
        train_cfg(records, tmp_path / "single", data={"batch_size": 4, "val_fraction": 0.25}, **over)
    )

    cfg = dump(
        train_cfg(
            records,
            tmp_path / "fsdp",
            runner={"type": "fsdp", "device": "cpu"},
            data={"batch_size": 2, "val_fraction": 0.25},
            **over,
        ),
        tmp_path / "fsdp.py",
    )
    proc = launch(cfg, "torchrun", 2, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc_per_node=2" in proc.stderr
    assert "rank 0/2" in proc.stderr and "global batch 4 = 2 x accum 1 x 2 rank(s)" in proc.stderr

    fsdp = losses(tmp_path / "fsdp")
    assert len(fsdp) == 4
    assert fsdp == pytest.approx(single["losses"], rel=1e-5)
    # the held-out loss counts each of the 5 samples once on 2 ranks too (rank 1's last share is all padding)
    held_out = losses(tmp_path / "fsdp", "eval")
    assert len(held_out) == 2 and held_out == pytest.approx(losses(tmp_path / "single", "eval"), rel=1e-5)
    # the exported model (gathered from the shards on rank 0) holds the same trained weights
    a, b = load_weights(tmp_path / "single" / "model"), load_weights(tmp_path / "fsdp" / "model")
    assert a.keys() == b.keys()
    for key in ("connector.mm_projector.0.weight", "image_newline", "llm.model.lm_head.weight"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert not torch.equal(
        a["connector.mm_projector.0.weight"], torch.zeros_like(a["connector.mm_projector.0.weight"])
    )
    # the dev-split VQA ran on rank 0 with the gathered model: the single process's answers, at every eval
    for step in (2, 4):
        scores = [
            json.loads((run_dir / "vqa_eval" / f"step-{step}" / "results.json").read_text())["metrics"]
            for run_dir in (tmp_path / "single", tmp_path / "fsdp")
        ]
        assert scores[0]["open_f1"]["n"] == 3 and scores[1] == scores[0], step
    vqa_rows = [
        r for r in map(json.loads, (tmp_path / "fsdp" / "metrics.jsonl").open()) if r["split"] == "vqa"
    ]
    assert [r["step"] for r in vqa_rows] == [2, 4]


def test_two_process_fsdp_trains_sva_like_one_process(tmp_path: Path) -> None:
    """SVA reads child modules' weights in its own forward (folded LayerNorms, proj_in halves, custom autograd
    functions); with its parameters sharded over two processes it still trains as one process does."""
    records = write_dataset(tmp_path / "data", n=12)
    over = {
        "schedule": {"max_steps": 3},
        "checkpoint": {"interval": 100, "export": False},
        "model": tiny_model_cfg(connector="sva"),
    }
    single = run(train_cfg(records, tmp_path / "single", data={"batch_size": 4}, **over))
    cfg = train_cfg(
        records, tmp_path / "fsdp", runner={"type": "fsdp", "device": "cpu"}, data={"batch_size": 2}, **over
    )
    proc = launch(dump(cfg, tmp_path / "fsdp.py"), "torchrun", 2, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "fsdp") == pytest.approx(single["losses"], rel=1e-5)


def test_two_process_dry_run_checks_the_data_in_shares(tmp_path: Path) -> None:
    """Each rank checks every other sample; rank 0 reports them all (reasons, file and line)."""
    records = write_dataset(tmp_path / "data", n=12, text_only_every=0)
    lines = records.read_text().splitlines()
    lines[3] = lines[3].replace("images/3.png", "images/gone.png")  # checked by rank 1
    lines[6] = lines[6][:30]  # rank 0
    lines[9] = lines[9][:20]  # rank 1
    records.write_text("\n".join(lines) + "\n")
    cfg = train_cfg(
        records, tmp_path / "fsdp", runner={"type": "fsdp", "device": "cpu"}, data={"batch_size": 2}
    )
    cfg_file = dump(cfg, tmp_path / "fsdp.py")
    cmd = [sys.executable, "-m", "cambrian_core.cli", "train", str(cfg_file), "--launcher", "torchrun"]
    proc = subprocess.run(
        [*cmd, "--nproc", "2", "--dry-run"], env=subprocess_env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "would be skipped" in line]
    assert len(said) == 1, proc.stderr[-3000:]  # rank 0 only
    assert "dry run: 3 of 12 training samples would be skipped: " in said[0]
    assert f"malformed line x2 ({records} line 7: " in said[0] and f"; {records} line 10: " in said[0]
    assert f"missing image x1 ({records} line 4: " in said[0]


@pytest.mark.gpu
def test_fsdp_on_one_gpu_with_nccl(tmp_path: Path) -> None:
    records = write_dataset(tmp_path / "data", n=16)
    over = {"schedule": {"max_steps": 3, "precision": "bf16"}, "checkpoint": {"interval": 2}}
    cfg = dump(
        train_cfg(records, tmp_path / "w", runner={"type": "fsdp"}, data={"batch_size": 4}, **over),
        tmp_path / "c.py",
    )
    proc = launch(cfg, "torchrun", 1, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/1 on cuda:0" in proc.stderr
    assert len(losses(tmp_path / "w")) == 3


def test_the_fp16_loss_scale_survives_a_resume(tmp_path: Path) -> None:
    # fp16 needs CUDA, so the scaler is attached by hand, as Runner.prepare does for precision="fp16"
    script = f"""
import os, torch
from pathlib import Path
from torch import nn
from cambrian_core.train.optim import build_scheduler
from cambrian_core.train.runners.fsdp import FSDPRunner

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleList()
        self.llm = nn.Module()
        self.llm.decoder_layers = nn.ModuleList([nn.Linear(4, 4)])

def make():
    r = FSDPRunner(device="cpu")
    r.setup()
    r.prepare(Tiny(), lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-3),
              lambda o: build_scheduler(o, 10), "fp32")
    r.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    return r

r = make()
r.scaler.scale(torch.ones(()))
r.scaler.update(new_scale=1024.0)  # after overflow back-offs
r.save_state(Path({str(tmp_path)!r}))
again = make()
again.load_state(Path({str(tmp_path)!r}))
print("scale after resume", again.scaler.get_scale())
torch.distributed.destroy_process_group()
"""
    env = {**subprocess_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "scale after resume 1024.0" in proc.stdout
