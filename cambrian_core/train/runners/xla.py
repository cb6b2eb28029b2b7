"""``xla``: one XLA device through torch_xla (TPU, or ``PJRT_DEVICE=CPU`` / ``CUDA``).

torch_xla is imported only when this runner is chosen; it is ABI-bound to one torch release (2.9.0 for
torch_xla 2.9.0), so it lives in its own environment: ``pip install -r requirements-xla.txt`` in a separate
venv. XLA compiles one graph per input shape, so set ``data.pad_to_multiple_of`` (e.g. 64) to keep the number
of shapes small.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cambrian_core.train.runners.base import (
    PRECISIONS,
    Adapt,
    Finalize,
    NonFiniteGradError,
    Runner,
    save_final,
)

__all__ = ["XLARunner", "register"]

INSTALL_HINT = (
    "runner `xla` needs torch_xla, which must match its torch exactly (torch_xla 2.9.0 <-> torch 2.9.0) and so "
    "cannot share this environment's torch {torch}. Make a separate venv: python3 -m venv .venv-xla && "
    ".venv-xla/bin/pip install -r requirements-xla.txt && .venv-xla/bin/pip install --no-deps -e . ; then run "
    "with PJRT_DEVICE=TPU (or CPU / CUDA) .venv-xla/bin/cambrian train CONFIG"
)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class XLARunner(Runner):
    """Training on one XLA device (``torch_xla.device()``); ``torch_xla.sync()`` closes each update's graph."""

    name = "xla"
    TARGET_LOGITS_ONLY = False  # selecting target rows gives data-dependent shapes: XLA would recompile

    def __init__(self) -> None:
        super().__init__(device="xla")

    def setup(self) -> None:
        try:
            import torch_xla
        except ImportError as exc:
            raise ImportError(INSTALL_HINT.format(torch=torch.__version__)) from exc
        if self.world_size > 1:
            raise RuntimeError("runner `xla` drives one XLA device per run here; launch it without torchrun")
        self._xla = torch_xla
        self.device = torch_xla.device()

    def _check_precision(self, precision: str) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"runner `xla` supports schedule.precision 'fp32' or 'bf16', not {precision!r}")

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.precision == "fp32":
            yield
            return
        with torch.autocast("xla", dtype=PRECISIONS[self.precision]):
            yield

    def step(self) -> float:
        norm = self.clip_and_norm_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._xla.sync()  # cut and run the graph of this update
        value = float(norm.cpu())
        if not math.isfinite(value):  # known only once the graph ran, so after the update: stop before a save
            raise NonFiniteGradError(value, applied=True)
        return value

    def clip_and_norm_tensor(self) -> torch.Tensor:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, self.clip_grad if self.clip_grad else float("inf"))

    def save_state(self, folder: Path) -> None:
        from safetensors.torch import save_file

        self._xla.sync()
        weights = {
            n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad
        }
        save_file(weights, str(folder / "trainable.safetensors"))
        torch.save(
            {"optimizer": _to_cpu(self.optimizer.state_dict()), "scheduler": self.scheduler.state_dict()},
            folder / "optimizer.pt",
        )

    def export(self, folder: Path, adapt: Adapt = None, finalize: Finalize = None) -> str | None:
        self._xla.sync()
        model = self.model.to("cpu")
        try:
            return save_final(model, folder, finalize)
        finally:
            self.model.to(self.device)


def register(registries: Any) -> None:
    registries.runners.register_module(name="xla", module=XLARunner)
