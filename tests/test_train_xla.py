"""The ``xla`` runner on ``PJRT_DEVICE=CPU``, in the separate torch_xla venv (``CAMBRIAN_XLA_PYTHON``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from _train_fixtures import dump, losses, run, subprocess_env, tiny_model_cfg, train_cfg, write_dataset

pytestmark = pytest.mark.xla


def test_xla_runner_trains_like_the_cpu_runner(tmp_path: Path) -> None:
    python = os.environ["CAMBRIAN_XLA_PYTHON"]
    records = write_dataset(tmp_path / "data", n=16)
    over = {"schedule": {"max_steps": 4}, "checkpoint": {"interval": 2, "export": True}}
    cpu = run(train_cfg(records, tmp_path / "cpu", **over))
    cfg = dump(
        train_cfg(records, tmp_path / "xla", runner={"type": "xla"}, data={"pad_to_multiple_of": 64}, **over),
        tmp_path / "xla.py",
    )
    env = {**subprocess_env(), "PJRT_DEVICE": "CPU"}
    proc = subprocess.run(
        [python, "-m", "cambrian_core.cli", "train", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "xla runner, rank 0/1 on xla:0" in proc.stderr
    got = losses(tmp_path / "xla")
    assert got == pytest.approx(cpu["losses"], rel=1e-3)
    assert (tmp_path / "xla" / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    assert (tmp_path / "xla" / "model" / "cambrian_config.json").is_file()


def test_xla_runner_trains_sva_like_the_cpu_runner(tmp_path: Path) -> None:
    """Cambrian-1 trained SVA on TPUs: the connector (custom autograd functions, in-LLM samplers) on an XLA device."""
    python = os.environ["CAMBRIAN_XLA_PYTHON"]
    records = write_dataset(tmp_path / "data", n=12)
    over = {
        "schedule": {"max_steps": 3},
        "checkpoint": {"interval": 100, "export": False},
        "model": tiny_model_cfg(connector="sva"),
    }
    cpu = run(train_cfg(records, tmp_path / "cpu", **over))
    cfg = train_cfg(
        records, tmp_path / "xla", runner={"type": "xla"}, data={"pad_to_multiple_of": 64}, **over
    )
    env = {**subprocess_env(), "PJRT_DEVICE": "CPU"}
    proc = subprocess.run(
        [python, "-m", "cambrian_core.cli", "train", str(dump(cfg, tmp_path / "xla.py"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "xla") == pytest.approx(cpu["losses"], rel=1e-3)
