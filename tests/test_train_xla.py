"""The ``xla`` runner on ``PJRT_DEVICE=CPU``, in the separate torch_xla venv (``CAMBRIAN_XLA_PYTHON``)."""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
from _train_fixtures import dump, losses, subprocess_env, tiny_model_cfg, train_cfg, write_dataset

pytestmark = pytest.mark.xla


def _train_in_xla_venv(cfg: dict, path: Path) -> subprocess.CompletedProcess:
    """``cambrian train`` in the torch_xla venv: the XLA run and its CPU reference share one torch build (torch
    2.9 and 2.14 differ by ~1e-3 in these losses, image preprocessing included)."""
    env = {**subprocess_env(), "PJRT_DEVICE": "CPU"}
    proc = subprocess.run(
        [os.environ["CAMBRIAN_XLA_PYTHON"], "-m", "cambrian_core.cli", "train", str(dump(cfg, path))],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_xla_runner_trains_like_the_cpu_runner(tmp_path: Path) -> None:
    records = write_dataset(tmp_path / "data", n=16)
    over = {"schedule": {"max_steps": 4}, "checkpoint": {"interval": 2, "export": True}}
    _train_in_xla_venv(train_cfg(records, tmp_path / "cpu", **over), tmp_path / "cpu.py")
    xla = train_cfg(
        records, tmp_path / "xla", runner={"type": "xla"}, data={"pad_to_multiple_of": 64}, **over
    )
    proc = _train_in_xla_venv(xla, tmp_path / "xla.py")
    assert "xla runner, rank 0/1 on xla:0" in proc.stderr
    assert losses(tmp_path / "xla") == pytest.approx(losses(tmp_path / "cpu"), rel=1e-4)
    assert (tmp_path / "xla" / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    assert (tmp_path / "xla" / "model" / "cambrian_config.json").is_file()


def test_xla_runner_trains_sva_like_the_cpu_runner(tmp_path: Path) -> None:
    """Cambrian-1 trained SVA on TPUs: the connector (custom autograd functions, in-LLM samplers) on an XLA device."""
    records = write_dataset(tmp_path / "data", n=12)
    over = {
        "schedule": {"max_steps": 3},
        "checkpoint": {"interval": 100, "export": False},
        "model": tiny_model_cfg(connector="sva"),
    }
    _train_in_xla_venv(train_cfg(records, tmp_path / "cpu", **over), tmp_path / "cpu.py")
    cfg = train_cfg(
        records, tmp_path / "xla", runner={"type": "xla"}, data={"pad_to_multiple_of": 64}, **over
    )
    _train_in_xla_venv(cfg, tmp_path / "xla.py")
    assert losses(tmp_path / "xla") == pytest.approx(losses(tmp_path / "cpu"), rel=1e-4)


def test_a_non_finite_gradient_stops_the_xla_run_before_any_save(tmp_path: Path) -> None:
    """XLA knows the gradient norm only once the update's graph ran: the run stops before the next checkpoint."""
    records = write_dataset(tmp_path / "data", n=16)
    over = {"schedule": {"max_steps": 4}, "checkpoint": {"interval": 2, "export": False}}
    cfg = train_cfg(
        records, tmp_path / "xla", runner={"type": "xla"}, data={"pad_to_multiple_of": 64}, **over
    )
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(
            f"""
            import sys
            from cambrian_core.cli import main
            from cambrian_core.train.metrics import NonFiniteLossError
            from cambrian_core.train.runners.xla import XLARunner
            real, calls = XLARunner.forward, [0]
            def poisoned(self, batch):
                loss = real(self, batch)
                calls[0] += 1
                if calls[0] == 3:  # a finite loss (adds 0) whose gradient is 0 * inf
                    p = next(p for p in self.model.parameters() if p.requires_grad)
                    loss = loss + (p - p.detach()).abs().sqrt().sum()
                return loss
            XLARunner.forward = poisoned
            try:
                main(["train", {str(dump(cfg, tmp_path / "xla.py"))!r}])
            except NonFiniteLossError as exc:
                print("STOPPED:", exc)
            """
        )
    )
    env = {**subprocess_env(), "PJRT_DEVICE": "CPU"}
    proc = subprocess.run(
        [os.environ["CAMBRIAN_XLA_PYTHON"], str(driver)], env=env, capture_output=True, text=True, timeout=500
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(
        r"STOPPED: the gradient norm is (nan|inf) at step 3; this runner computes it", proc.stdout
    )
    assert [p.name for p in (tmp_path / "xla" / "checkpoints").iterdir()] == ["step_00000002"]
