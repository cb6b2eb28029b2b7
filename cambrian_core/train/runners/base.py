"""The runner contract: where the model runs and how one optimiser update happens.

The recipe owns data, logging and checkpoint bookkeeping; a runner owns devices and processes (placement,
wrapping / sharding, autocast, backward, gradient sync, clipping, the optimiser step) and the parts of a
checkpoint that depend on them (full trainable weights, optimiser state). Runners are registered in
``RUNNERS`` (``single``, ``fsdp``, ``deepspeed``, ``xla``) and picked by ``runner=dict(type=...)``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cambrian_core.model.encoder import StagedTokens

__all__ = ["PRECISIONS", "NonFiniteGradError", "Runner", "move_to", "rebuild_with", "save_final"]

Adapt = Callable[[nn.Module], None] | None
Finalize = Callable[[nn.Module], bool] | None

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def move_to(batch: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    """Move every tensor of a nested batch to ``device`` (floating tensors optionally cast)."""
    if isinstance(batch, torch.Tensor):
        if float_dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=float_dtype, non_blocking=True)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, StagedTokens):
        return batch.to(device=device, dtype=float_dtype, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device, float_dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device, float_dtype) for v in batch)
    return batch


class NonFiniteGradError(FloatingPointError):
    """The gradient norm of an update is inf or NaN (the loss was finite).

    ``applied``: whether the update was applied anyway (runners whose engine computes the norm inside its
    step: DeepSpeed, XLA); then the weights in memory are not to be saved.
    """

    def __init__(self, norm: float, applied: bool = False) -> None:
        super().__init__(f"gradient norm is {norm}" + (" (the update was applied)" if applied else ""))
        self.norm = norm
        self.applied = applied


class Runner:
    """Base runner: one process, one device. Subclasses override what their engine does differently.

    Args:
        device: ``auto`` (cuda > mps > cpu), or an explicit torch device string.
    """

    name = "base"
    #: the model inputs a batch carries (the rest is bookkeeping)
    MODEL_KEYS = (
        "input_ids",
        "attention_mask",
        "labels",
        "pixel_values",
        "image_sizes",
        "tower_features",
        "position_ids",
    )

    #: compute the LM head only at target positions (off where shapes must stay static, e.g. XLA)
    TARGET_LOGITS_ONLY = True

    def __init__(self, device: str = "auto") -> None:
        self.requested_device = device
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.precision = "fp32"
        self.clip_grad: float | None = None
        self.scaler: Any = None

    # ------------------------------------------------------------------------------------------ processes
    @property
    def rank(self) -> int:
        return int(os.environ.get("RANK", 0))

    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", 1))

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self) -> None:
        """Start the process group (distributed runners) and pick the device."""
        self.device = self._pick_device()

    def _pick_device(self) -> torch.device:
        want = self.requested_device
        if want == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", self.local_rank)
            if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                return torch.device("mps")
            return torch.device("cpu")
        dev = torch.device(want)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", self.local_rank)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"runner.device={want!r} but CUDA is not available here; use device='auto' or 'cpu'"
            )
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(
                f"runner.device={want!r} but MPS is not available here; use device='auto' or 'cpu'"
            )
        return dev

    def barrier(self) -> None:
        """Wait for every rank (no-op with one process)."""

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or mean / max) a small CPU tensor over ranks (identity with one process)."""
        return values

    def teardown(self) -> None:
        """Release the process group."""

    # ------------------------------------------------------------------------------------------ model
    def prepare(
        self,
        model: nn.Module,
        make_optimizer: Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer],
        make_scheduler: Callable[[torch.optim.Optimizer], Any],
        precision: str = "bf16",
        clip_grad: float | None = None,
        grad_accum: int = 1,
        micro_batch_size: int = 1,
    ) -> None:
        """Place / wrap ``model`` and build its optimiser and scheduler (after wrapping, on the real params)."""
        self._check_precision(precision)
        self.precision, self.clip_grad = precision, clip_grad
        self.model = self.wrap(model)
        self.optimizer = make_optimizer(list(self.model.named_parameters()))
        self.scheduler = make_scheduler(self.optimizer)
        if precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)

    def _check_precision(self, precision: str) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"schedule.precision={precision!r}; choose one of {sorted(PRECISIONS)}")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("schedule.precision='fp16' needs a CUDA device; use 'bf16' (or 'fp32')")

    def wrap(self, model: nn.Module) -> nn.Module:
        """Put the model on the device (subclasses shard it)."""
        return model.to(self.device)

    @property
    def unwrapped(self) -> nn.Module:
        """The composed model itself (attributes such as ``towers`` and ``llm``)."""
        assert self.model is not None
        return self.model

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 / fp16 autocast around forward passes (fp32: nothing)."""
        if self.precision == "fp32":
            yield
            return
        with torch.autocast(self.device.type, dtype=PRECISIONS[self.precision]):
            yield

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The loss of one micro-batch (inputs moved to the device, under autocast)."""
        inputs = {k: batch[k] for k in self.MODEL_KEYS if batch.get(k) is not None}
        inputs = move_to(inputs, self.device)
        with self.autocast():
            # no KV cache in training (and HF packs segments); logits only where targets are
            out = self.model(**inputs, use_cache=False, loss_only=self.TARGET_LOGITS_ONLY)
        return out.loss

    def backward(self, loss: torch.Tensor, last_micro: bool = True) -> None:
        """Accumulate gradients of ``loss``; ``last_micro`` marks the micro-batch that ends the update."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> float:
        """Clip, apply the update, advance the schedule, clear gradients; return the gradient norm."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = self.clip_and_norm()
        if self.scaler is None and not math.isfinite(norm):  # fp16's scaler skips such a step itself
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteGradError(norm)
        applied = True
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            applied = self.scaler.get_scale() >= scale  # the scale drops exactly when it skipped the step
        else:
            self.optimizer.step()
        if applied:  # a skipped fp16 update does not use up the schedule (warm-up included), as in HF Trainer
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def clip_and_norm(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.clip_grad if self.clip_grad else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def current_lrs(self) -> dict[str, float]:
        """``{group name: lr}`` right now."""
        return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(self.optimizer.param_groups)}

    # ------------------------------------------------------------------------------------------ state
    def trainable_names(self) -> list[str]:
        return [n for n, p in self.unwrapped.named_parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable weights, on CPU, on the main rank (other ranks may return ``{}``)."""
        return {n: p.detach().cpu().clone() for n, p in self.unwrapped.named_parameters() if p.requires_grad}

    def load_trainable(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy full trainable weights into the (possibly sharded) model; every name must exist."""
        params = dict(self.unwrapped.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(
                f"checkpoint weights {unknown[:5]} do not exist in this model (another architecture?)"
            )
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].dtype))

    def save_state(self, folder: Path) -> None:
        """Write trainable weights, optimiser and scheduler state into ``folder`` (called on every rank)."""
        weights = self.trainable_state_dict()
        if self.is_main:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "trainable.safetensors"))
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                },
                folder / "optimizer.pt",
            )

    def load_state(self, folder: Path) -> None:
        """Undo :meth:`save_state` (every rank reads the same files)."""
        self.load_trainable(load_file(str(folder / "trainable.safetensors")))
        state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def gather_model(self, adapt: Adapt = None) -> nn.Module | None:
        """The whole model on the main rank, ``None`` on the others. Sharded runners override it to gather an
        unsharded CPU copy there (collective: every rank calls it); ``adapt(fresh_model)`` re-applies structural
        changes (LoRA) to such a rebuilt copy."""
        return self.unwrapped if self.is_main else None

    def eval_model(self, adapt: Adapt = None) -> nn.Module | None:
        """The whole trained model on the runner's device, for generation (the ``eval`` section's dev-split VQA),
        on the main rank; ``None`` on the others (collective, see :meth:`gather_model`)."""
        model = self.gather_model(adapt)
        return None if model is None else model.to(self.device)

    def export(self, folder: Path, adapt: Adapt = None, finalize: Finalize = None) -> str | None:
        """Save the trained model with ``save_pretrained`` (main rank); returns the folder there.

        ``adapt`` as in :meth:`gather_model`; ``finalize(model) -> bool`` runs just before saving (merging
        adapters) and may veto the save.
        """
        model = self.gather_model(adapt)
        return None if model is None else save_final(model, folder, finalize)


def save_final(model: nn.Module, folder: Path, finalize: Finalize = None) -> str | None:
    """``finalize`` then ``save_pretrained`` (``None`` when ``finalize`` vetoed the save)."""
    if finalize is not None and not finalize(model):
        return None
    return model.save_pretrained(str(folder))


def rebuild_with(model: nn.Module, state: Mapping[str, torch.Tensor], adapt: Adapt = None) -> nn.Module:
    """A fresh, unsharded CPU copy of ``model``'s architecture holding ``state`` (built on the meta device; the
    buffers that are not in the state dict come from ``model``)."""
    from cambrian_core.registry import MODELS, build

    with torch.device("meta"):
        fresh = build(MODELS, {"type": "cambrian", **model.model_config})
    fresh.set_stage(model.stage, log_table=False)
    if adapt is not None:
        adapt(fresh)
    fresh.load_state_dict(dict(state), assign=True, strict=True)
    # buffers outside the state dict (rotary frequencies...) are not sharded: take the live model's
    live = dict(model.named_buffers())
    for name, buf in list(fresh.named_buffers()):
        if buf.is_meta and name in live:
            owner, _, attr = name.rpartition(".")
            fresh.get_submodule(owner)._buffers[attr] = live[name].detach().to("cpu", copy=True)
    return fresh
