"""Checkpoints: a resumed run's losses equal the uninterrupted run's; kill -9 during a save is harmless."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _train_fixtures import run, train_cfg, write_dataset
from mmengine.config import Config
from safetensors.torch import load_file

from cambrian_core.train.checkpoint import CheckpointError, CheckpointManager, is_complete
from cambrian_core.train.recipe import TrainRecipe

TESTS = Path(__file__).parent
# 16 samples, 2 per micro-batch, 2 micro-batches per update: 4 updates per epoch, so 6 steps cross an epoch
OVER = {
    "data": {"batch_size": 2},
    "schedule": {"max_steps": 6, "grad_accum": 2, "warmup_ratio": 0.3},
    "checkpoint": {"interval": 2, "keep_last": 2},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bitwise comparisons need one BLAS thread: MKL may otherwise split reductions differently run to run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), n=16)


@pytest.fixture(scope="module")
def uninterrupted(records: Path, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    out = run(train_cfg(records, tmp_path_factory.mktemp("full"), **OVER))
    assert out["step"] == 6
    return out["losses"]


def test_stop_and_resume_gives_identical_losses(
    records: Path, uninterrupted: list[float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = TrainRecipe.save

    def save_then_stop(self: TrainRecipe) -> Path:
        real_save(self)
        raise KeyboardInterrupt  # Ctrl-C right after the step-2 checkpoint

    monkeypatch.setattr(TrainRecipe, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(train_cfg(records, tmp_path, **OVER))
    monkeypatch.setattr(TrainRecipe, "save", real_save)
    assert [p.name for p in CheckpointManager(tmp_path / "checkpoints").complete()] == ["step_00000002"]

    resumed = run(train_cfg(records, tmp_path, **OVER), resume="auto")
    assert resumed["step"] == 6
    assert resumed["losses"] == uninterrupted  # bit for bit: weights, optimiser, schedule, sampler, RNG


def test_resume_after_an_epoch_ending_with_a_shorter_window(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 13 image samples, 6 micro-batches of 2 per epoch in windows of 4 and 2: the step-2 checkpoint follows the
    # epoch's short update
    over = {**OVER, "schedule": {"max_steps": 5, "grad_accum": 4}, "checkpoint": {"interval": 2}}
    full = run(train_cfg(records, tmp_path / "full", **over))
    assert full["step"] == 5
    real_save = TrainRecipe.save

    def save_then_stop(self: TrainRecipe) -> Path:
        real_save(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainRecipe, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(train_cfg(records, tmp_path / "cut", **over))
    monkeypatch.setattr(TrainRecipe, "save", real_save)
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step_00000002" / "state.pt", weights_only=True)
    assert state["sampler"]["consumed_batches"] == 6  # the whole epoch, its short last window included
    resumed = run(train_cfg(records, tmp_path / "cut", **over), resume="auto")
    assert resumed["losses"] == full["losses"]


def test_kill_during_save_keeps_previous_checkpoint(
    records: Path, uninterrupted: list[float], tmp_path: Path
) -> None:
    cfg_path = tmp_path / "tiny.py"
    Config(train_cfg(records, tmp_path / "work", **OVER)).dump(str(cfg_path))
    mark = tmp_path / "saving"
    script = tmp_path / "train_and_hang.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            from pathlib import Path
            sys.path.insert(0, {str(TESTS)!r})
            from cambrian_core.train import checkpoint as ck
            real = ck.CheckpointManager.save
            def save(self, step, write):
                if step != 4:
                    return real(self, step, write)
                def hang(tmp):
                    write(tmp)  # weights and optimiser written, COMPLETE not yet, no rename
                    Path({str(mark)!r}).write_text("x")
                    time.sleep(300)
                return real(self, step, hang)
            ck.CheckpointManager.save = save
            from cambrian_core.cli import main
            sys.exit(main(["train", {str(cfg_path)!r}]))
            """
        )
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while not mark.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"training never reached the step-4 save: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    ckpts = tmp_path / "work" / "checkpoints"
    partial = ckpts / ".tmp-step_00000004"
    assert partial.is_dir() and (partial / "trainable.safetensors").is_file() and not is_complete(partial)
    manager = CheckpointManager(ckpts)
    assert manager.latest() == ckpts / "step_00000002"
    good = manager.latest()
    assert set(load_file(str(good / "trainable.safetensors"))) == {
        "connector.mm_projector.0.weight",
        "connector.mm_projector.0.bias",
        "connector.mm_projector.2.weight",
        "connector.mm_projector.2.bias",
        "image_newline",
    }
    assert torch.load(good / "state.pt", weights_only=True)["step"] == 2

    from cambrian_core.cli import main

    assert main(["train", str(cfg_path), "--resume", "auto"]) == 0
    assert [p.name for p in manager.complete()] == ["step_00000004", "step_00000006"]
    assert not partial.exists()  # the next save cleared the debris
    history = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    after = {r["step"]: r["loss"] for r in history if r["split"] == "train"}
    assert [after[s] for s in (3, 4, 5, 6)] == uninterrupted[2:]


def test_manager_completeness_pruning_and_errors(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        m.save(step, lambda d, s=step: (d / "w.bin").write_bytes(b"x" * s))
    assert [p.name for p in m.complete()] == ["step_00000002", "step_00000003"]
    (tmp_path / "step_00000003" / "w.bin").write_bytes(b"x")  # truncated after the fact
    assert m.latest() == tmp_path / "step_00000002"
    assert m.resolve("auto") == tmp_path / "step_00000002"
    assert m.resolve(tmp_path) == tmp_path / "step_00000002"
    assert m.resolve(None) is None and CheckpointManager(tmp_path / "none").resolve("auto") is None
    with pytest.raises(CheckpointError, match="no such folder"):
        m.resolve(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        m.resolve(tmp_path / "empty")
    # a damaged checkpoint asked for by path: the error names the file and the checkpoint to use instead
    with pytest.raises(CheckpointError) as err:
        m.resolve(tmp_path / "step_00000003")
    assert "(w.bin has 1 bytes where COMPLETE says 3 (damaged or cut short))" in str(err.value)
    assert f"--resume {tmp_path / 'step_00000002'} (or --resume auto)" in str(err.value)
    with pytest.raises(CheckpointError, match=r"no COMPLETE marker .* this run has no complete checkpoint"):
        CheckpointManager(tmp_path / "none").resolve(tmp_path / "empty")


def _train_rows(work: Path) -> list[dict]:
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def test_a_resumed_run_keeps_skip_counts_and_one_metrics_row_per_step(tmp_path: Path) -> None:
    import shutil

    data = write_dataset(tmp_path / "data", n=16)
    lines = data.read_text().splitlines()
    bad = {
        "id": "bad",
        "image": "images/missing.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "A scan."},
        ],
    }
    lines[3] = lines[9] = json.dumps(bad)
    data.write_text("\n".join(lines) + "\n")
    run(train_cfg(data, tmp_path / "full", **OVER))
    cut = tmp_path / "cut"
    run(train_cfg(data, cut, **OVER))
    # as if the run died after logging steps 5 and 6 but before their checkpoint was complete
    shutil.rmtree(cut / "checkpoints" / "step_00000006")
    run(train_cfg(data, cut, **OVER), resume="auto")
    full, resumed = _train_rows(tmp_path / "full"), _train_rows(cut)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # steps 5 and 6 once, from the resumed run
    assert [r["skipped"] for r in resumed] == [r["skipped"] for r in full] and full[-1]["skipped"] > 0
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]


def test_the_logged_lr_is_the_one_each_update_used(records: Path, tmp_path: Path, monkeypatch) -> None:
    from cambrian_core.registry import RUNNERS

    runner_cls = RUNNERS.get("single")
    real_step, used = runner_cls.step, []

    def step(self):
        used.append(max(g["lr"] for g in self.optimizer.param_groups))
        return real_step(self)

    monkeypatch.setattr(runner_cls, "step", step)
    run(train_cfg(records, tmp_path, **OVER))
    logged = [r["lr"] for r in _train_rows(tmp_path)]
    assert logged == pytest.approx(used) and len(used) == 6
    assert used[0] < used[2]  # warm-up: the first update uses a smaller lr than the later ones


def test_a_resave_killed_between_its_renames_loses_no_checkpoint(tmp_path: Path, monkeypatch) -> None:
    from cambrian_core.train.checkpoint import CheckpointManager

    root = tmp_path / "checkpoints"
    m = CheckpointManager(root, keep_last=1)
    m.save(2, lambda d: (d / "w.bin").write_bytes(b"first"))
    real = os.rename
    calls = {"n": 0}

    def killed(a, b):  # step_2 moved aside to .old-step_2, then the process dies
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        m.save(2, lambda d: (d / "w.bin").write_bytes(b"second"))
    monkeypatch.setattr(os, "rename", real)
    assert [p.name for p in root.iterdir() if p.name.startswith("step_")] == []
    (found,) = m.complete()  # the moved-aside copy still counts, so --resume auto finds it
    assert found.name == ".old-step_00000002" and m.resolve("auto") == found
    m.save(4, lambda d: (d / "w.bin").write_bytes(b"third"))  # the next save puts it back, then rotates
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004"]


def _stop_after_first_save(monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = TrainRecipe.save

    def save_then_stop(self: TrainRecipe) -> Path:
        real_save(self)
        monkeypatch.setattr(TrainRecipe, "save", real_save)
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainRecipe, "save", save_then_stop)


def test_resume_checks_the_batch_layout_names_optim_changes_and_keeps_tensorboard(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = {**OVER, "log": {"tensorboard": True, "interval": 1}}
    _stop_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(train_cfg(records, tmp_path, **over))
    # micro-batches of another size: the saved position would skip and repeat samples
    smaller = {**over, "data": {"batch_size": 1}}
    with pytest.raises(
        CheckpointError, match=r"another layout \(batch_size 2 -> 1\).*schedule.gradient_checkpointing"
    ):
        run(train_cfg(records, tmp_path, **smaller), resume="auto")
    lower = {**over, "optim": {"lr": 1e-5, "weight_decay": 0.1}}
    assert run(train_cfg(records, tmp_path, **lower), resume="auto")["step"] == 6
    log = (tmp_path / "train.log").read_text()
    assert (
        "WARNING: changed since step_00000002 was saved and NOT applied (its optimiser state keeps the old values): "
        "optim.lr 0.001 -> 1e-05, optim.weight_decay 0.0 -> 0.1; to train on with them, start a new run with "
        "load_from=" in log
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]  # the checkpoint's step kept


def test_a_rollback_sets_the_abandoned_runs_later_checkpoints_aside(
    records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = {**OVER, "checkpoint": {"interval": 2, "keep_last": 3}}
    run(train_cfg(records, tmp_path, **over))
    manager = CheckpointManager(tmp_path / "checkpoints")
    assert [p.name for p in manager.complete()] == ["step_00000002", "step_00000004", "step_00000006"]
    _stop_after_first_save(monkeypatch)  # back to step 2 (say, after a loss spike), interrupted after step 4
    with pytest.raises(KeyboardInterrupt):
        run(train_cfg(records, tmp_path, **over), resume=str(tmp_path / "checkpoints" / "step_00000002"))
    assert [p.name for p in manager.complete()] == ["step_00000002", "step_00000004"]
    assert manager.resolve("auto").name == "step_00000004"  # the rolled-back run, not the abandoned step 6
    aside = list((tmp_path / "previous").glob("*/checkpoints/*"))
    assert sorted(p.name for p in aside) == ["step_00000004", "step_00000006"]
    assert (
        "the abandoned run's later checkpoints step_00000004, step_00000006 moved to"
        in (tmp_path / "train.log").read_text()
    )
