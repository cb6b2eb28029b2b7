"""Crash-safe checkpoints: write into a temporary folder, fsync, then rename; keep the last k; resume.

Layout of ``<work_dir>/checkpoints/step_00000100/``:

* ``trainable.safetensors``: the trainable weights (full, unsharded; what the stage trained)
* ``state.pt``: step, epoch, sampler position, scheduler, metric history (``torch.load(weights_only=True)``)
* ``optimizer.pt`` or the runner's own files (DeepSpeed writes ``ds/``), ``rng_rank<r>.pt`` per rank
* ``config.json``: the resolved config of the run
* ``COMPLETE``: written last, listing every file with its size

A folder counts only when it is named ``step_*`` (the rename happened) and ``COMPLETE`` matches the files, so a
save killed at any moment (kill -9, power loss) leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cambrian_core.fileio import fsync_path, fsync_tree

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "capture_rng",
    "is_complete",
    "restore_rng",
]

COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (incomplete, missing, or from another run)."""


def incomplete_reason(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` is not a finished checkpoint (``None``: ``COMPLETE`` present, every listed file intact)."""
    folder = Path(folder)
    marker = folder / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} marker (a save that was interrupted leaves such folders)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, OSError, TypeError):
        return f"its {COMPLETE} marker is unreadable"
    for f, n in files.items():
        path = folder / f
        if not path.is_file():
            return f"{f} is missing ({COMPLETE} lists it)"
        size = path.stat().st_size
        if size != n:
            return f"{f} has {size} bytes where {COMPLETE} says {n} (damaged or cut short)"
    return None


def is_complete(folder: str | os.PathLike) -> bool:
    """``True`` when ``folder`` is a finished checkpoint: ``COMPLETE`` present and every listed file intact."""
    return incomplete_reason(folder) is None


def capture_rng() -> dict[str, Any]:
    """Every RNG state of this process (python, numpy, torch CPU and CUDA) in a ``weights_only``-safe form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves, finds and prunes the checkpoints of one run.

    Args:
        root: folder holding ``step_*`` checkpoints.
        keep_last: how many complete checkpoints to keep (older ones are removed after a successful save).
        is_main: this process does the folder bookkeeping (rank 0).
        barrier: synchronises the ranks (no-op for one process).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        keep_last: int = 2,
        is_main: bool = True,
        barrier: Callable[[], None] = lambda: None,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.is_main = is_main
        self.barrier = barrier

    # ----------------------------------------------------------------------------------------------- saving
    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Write checkpoint ``step``: every rank calls ``write(tmp_folder)``, then rank 0 seals and renames it.

        Returns the final folder. On any error the temporary folder is left behind (ignored and cleaned by the
        next save) and the previous checkpoints are untouched.
        """
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}"
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
            self._recover_swaps()
            tmp.mkdir()
        self.barrier()
        write(tmp)
        self.barrier()
        if self.is_main:
            sizes = fsync_tree(tmp)
            marker = tmp / COMPLETE
            marker.write_text(json.dumps({"step": step, "time": time.time(), "files": sizes}, indent=1))
            fsync_path(marker)
            fsync_path(tmp)
            if final.exists():  # re-saving a step (resumed from an earlier one): swap, never leave a gap
                old = self.root / f".old-step_{step:08d}"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            fsync_path(self.root)
            self.prune()
        self.barrier()
        return final

    def prune(self) -> list[Path]:
        """Remove complete checkpoints beyond the newest ``keep_last``; return what was removed."""
        done = self.complete()
        removed = done[: max(0, len(done) - self.keep_last)]
        for p in removed:
            shutil.rmtree(p, ignore_errors=True)
        return removed

    def later_than(self, step: int) -> list[Path]:
        """Every ``step_*`` folder (complete or not, and a re-save's ``.old-step_*``) of a step after ``step``."""
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            m = _STEP_RE.match(p.name.removeprefix(".old-"))
            if m and p.is_dir() and int(m.group(1)) > step:
                out.append(p)
        return out

    # ----------------------------------------------------------------------------------------------- finding
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found: dict[int, Path] = {}
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and is_complete(p):
                found[int(m.group(1))] = p
        for p in self.root.glob(".old-step_*"):  # a re-save killed between its two renames: still usable
            m = _STEP_RE.match(p.name.removeprefix(".old-"))
            if m and p.is_dir() and int(m.group(1)) not in found and is_complete(p):
                found[int(m.group(1))] = p
        return [found[k] for k in sorted(found)]

    def _recover_swaps(self) -> None:
        """Finish a re-save killed between its renames: the ``.old-step_N`` copy goes when ``step_N`` is complete,
        and comes back as ``step_N`` when it is not (main rank)."""
        for old in self.root.glob(".old-step_*"):
            final = self.root / old.name.removeprefix(".old-")
            if final.is_dir() and is_complete(final):
                shutil.rmtree(old, ignore_errors=True)
            elif is_complete(old):
                shutil.rmtree(final, ignore_errors=True)
                os.rename(old, final)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or ``None``."""
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, resume: str | os.PathLike | bool | None) -> Path | None:
        """Turn ``--resume`` into a checkpoint folder: ``auto``/``True`` = newest complete (or ``None``), a path =
        that checkpoint (or the newest complete one inside it when it is a ``checkpoints`` folder).

        Raises:
            CheckpointError: the path does not exist or holds no complete checkpoint.
        """
        if resume in (None, False, "", "none"):
            return None
        if resume in (True, "auto"):
            return self.latest()
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"--resume {path}: no such folder")
        reason = incomplete_reason(path)
        if reason is None:
            return path
        inner = CheckpointManager(path).latest() or CheckpointManager(path / "checkpoints").latest()
        if inner is None:
            newest = self.latest()
            advice = (
                f"--resume {newest} (or --resume auto) takes the newest complete one"
                if newest is not None
                else "this run has no complete checkpoint: without --resume it starts from step 0"
            )
            raise CheckpointError(
                f"--resume {path}: not a complete checkpoint ({reason}) and it holds none; {advice}"
            )
        return inner
