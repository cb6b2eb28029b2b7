"""``deepspeed``: DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload, from the seed's three JSON configs.

The JSON's ``"auto"`` values are filled from the run's config (micro-batch, accumulation, clipping,
precision). The optimiser and lr schedule are always the recipe's (per-module groups, warmup + cosine),
handed to DeepSpeed as client objects; a DeepSpeed JSON that declares its own ``optimizer`` / ``scheduler`` is
refused rather than silently overriding one or the other. On a machine without GPUs DeepSpeed runs on the CPU
over gloo; its C++ ops are not compiled there (the shared-memory all-reduce op is skipped, gloo does every
collective, and ``torch.optim.AdamW`` is allowed with offload), so the first run does not spend minutes in JIT.
"""

from __future__ import annotations

import atexit
import copy
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from cambrian_core.train.runners.base import PRECISIONS, Adapt, NonFiniteGradError, Runner, rebuild_with
from cambrian_core.train.runners.distributed import all_reduce, barrier

__all__ = ["DeepSpeedRunner", "fill_ds_config", "register", "resolve_config_path"]

_INSTALL = "runner `deepspeed` needs DeepSpeed: pip install 'cambrian[deepspeed]' (or pip install deepspeed)"


def resolve_config_path(path: str) -> Path:
    """``scope::rel/path.json`` (a plugin's config folder, e.g. ``cambrian::_base_/runtime/zero2.json``) or a path."""
    if "::" in path:
        from cambrian_core.plugins import config_dirs

        scope, _, rel = path.partition("::")
        dirs = config_dirs()
        if scope not in dirs:
            raise FileNotFoundError(
                f"DeepSpeed config {path}: unknown config scope `{scope}`; scopes: {sorted(dirs)}"
            )
        return Path(dirs[scope]) / rel
    return Path(path)


def fill_ds_config(
    config: Mapping[str, Any],
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    precision: str,
    clip_grad: float | None,
) -> dict[str, Any]:
    """A DeepSpeed config with every ``"auto"`` resolved and precision / clipping set from the run.

    Raises:
        ValueError: the JSON declares an optimiser or schedule, keeps an ``"auto"`` cambrian cannot fill, or
            sets a concrete value the run sets itself to something else (batch sizes, accumulation, clipping,
            precision): DeepSpeed would otherwise follow the JSON, or fail without naming the run's setting.
    """
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ValueError(
                f"the DeepSpeed config declares `{section}`; cambrian builds the optimiser and schedule itself "
                "(optim / schedule sections, per-module lrs); remove that section from the JSON"
            )
    cfg = copy.deepcopy(dict(config))
    fill = {  # key -> (the run's value, the setting it comes from)
        "train_micro_batch_size_per_gpu": (micro_batch_size, "data.batch_size"),
        "gradient_accumulation_steps": (grad_accum, "schedule.grad_accum"),
        "train_batch_size": (
            micro_batch_size * grad_accum * world_size,
            f"data.batch_size x schedule.grad_accum x {world_size} process(es)",
        ),
        "gradient_clipping": (float(clip_grad or 0.0), "schedule.clip_grad (None = 0.0)"),
    }
    clashes = []
    for k, (v, origin) in fill.items():
        given = cfg.get(k, "auto")
        if given == "auto":
            cfg[k] = v
        elif given != v:
            clashes.append(f"{k} = {given!r} (the run's {origin} gives {v!r})")
    for kind in ("bf16", "fp16"):
        section = dict(cfg.get(kind) or {})
        wanted = precision == kind
        if section.get("enabled", "auto") not in ("auto", wanted):
            clashes.append(
                f"{kind}.enabled = {section['enabled']!r} (the run's schedule.precision is {precision!r})"
            )
        cfg[kind] = {**section, "enabled": wanted}
    if clashes:
        raise ValueError(
            f'the DeepSpeed config sets values the run sets itself: {"; ".join(clashes)}; write "auto" there '
            "(cambrian fills it in) or change the run's setting"
        )
    # "auto" sizes in zero_optimization (buckets, prefetch, persistence) take DeepSpeed's defaults
    zero = cfg.get("zero_optimization", {})
    cfg["zero_optimization"] = {k: v for k, v in zero.items() if v != "auto"}
    left = [k for k, v in cfg.items() if v == "auto"]
    if left:
        raise ValueError(
            f"DeepSpeed config keys {left} are 'auto' but cambrian has no value for them; set them"
        )
    cfg["zero_force_ds_cpu_optimizer"] = False  # the client AdamW works with offload; no cpu_adam JIT build
    cfg.setdefault("steps_per_print", 1 << 30)
    return cfg


def _skip_shm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op on CPU (gloo does the collectives)."""
    import deepspeed.comm.torch  # noqa: F401  (registers the module in sys.modules)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


class DeepSpeedRunner(Runner):
    """DeepSpeed ZeRO training over torchrun / deepspeed-launcher processes.

    Args:
        config: DeepSpeed JSON (path, ``scope::path``, or a dict), e.g. ``cambrian::_base_/runtime/zero3.json``.
        device: ``auto`` (CUDA when present, else CPU with gloo).
    """

    name = "deepspeed"

    def __init__(
        self, config: str | Mapping[str, Any] = "cambrian::_base_/runtime/zero2.json", device: str = "auto"
    ) -> None:
        super().__init__(device)
        self.config_source = config

    def load_json(self) -> dict[str, Any]:
        if isinstance(self.config_source, Mapping):
            return dict(self.config_source)
        path = resolve_config_path(str(self.config_source))
        if not path.is_file():
            raise FileNotFoundError(f"runner.config: DeepSpeed config {path} does not exist")
        return json.loads(path.read_text())

    def setup(self) -> None:
        super().setup()
        try:
            import deepspeed
        except ImportError as exc:
            raise ImportError(_INSTALL) from exc
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            _skip_shm_build()
        elif self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        import torch.distributed as dist

        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo" if self.device.type == "cpu" else "nccl")
            # DeepSpeed caches its groups per process: the group lives until the process ends, so a second run in
            # the same process (a sweep, the tests) reuses it instead of failing on a re-created one
            atexit.register(dist.destroy_process_group)

    def barrier(self) -> None:
        barrier()

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return all_reduce(values, self.device, op)

    def teardown(self) -> None:
        self.barrier()  # the process group itself is destroyed at exit (see setup)

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
        import deepspeed

        self._check_precision(precision)
        self.precision, self.clip_grad = precision, clip_grad
        try:
            self.ds_config = fill_ds_config(
                self.load_json(), micro_batch_size, grad_accum, self.world_size, precision, clip_grad
            )
        except ValueError as exc:  # the JSON and the run disagree: a config error (exit 2), no traceback
            from cambrian_core.config import ConfigError, Problem

            where = (
                self.config_source if isinstance(self.config_source, str) else "the inline DeepSpeed config"
            )
            raise ConfigError([Problem("runner.config", f"{where}: {exc}")]) from None
        model = model.to(self.device)
        optimizer = make_optimizer(list(model.named_parameters()))
        for g in optimizer.param_groups:  # DeepSpeed copies groups; names are only kept for logging
            g.pop("param_names", None)
        engine, optim, _, sched = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=make_scheduler, config=self.ds_config
        )
        self.model, self.engine, self.optimizer, self.scheduler = engine, engine, optim, sched

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    @property
    def unwrapped(self) -> nn.Module:
        return self.engine.module

    def autocast(self):  # type: ignore[override]
        import contextlib

        return contextlib.nullcontext()  # DeepSpeed keeps the weights in the training dtype itself

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        from cambrian_core.train.runners.base import move_to

        inputs = {k: batch[k] for k in self.MODEL_KEYS if batch.get(k) is not None}
        dtype = PRECISIONS[self.precision] if self.precision != "fp32" else None
        inputs = move_to(inputs, self.device)
        if dtype is not None:  # pixels / cached features in the weights' dtype
            for key in ("pixel_values", "tower_features"):
                if key in inputs:
                    inputs[key] = [x.to(dtype) for x in inputs[key]]
        return self.engine(**inputs, use_cache=False, loss_only=self.TARGET_LOGITS_ONLY).loss

    def backward(self, loss: torch.Tensor, last_micro: bool = True) -> None:
        # the recipe marks the boundary (an epoch's last window may be shorter than grad_accum), before the
        # backward: ZeRO reduces gradients in backward hooks on the boundary micro-batch
        self.engine.set_gradient_accumulation_boundary(last_micro)
        # the recipe already weights each micro-batch by its share of the window's target tokens
        self.engine.backward(loss, scale_wrt_gas=False)
        if not last_micro:
            self.engine.step()  # not a boundary: DeepSpeed only advances its micro-step counter

    def step(self) -> float:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed and the recipe disagree on the gradient-accumulation boundary")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return float("nan")
        # DeepSpeed computes the norm inside its step, so a non-finite one is seen after the update (fp16's loss
        # scaler skips those steps itself): stop before anything is saved from these weights
        if not math.isfinite(float(norm)) and self.precision != "fp16":
            raise NonFiniteGradError(float(norm), applied=True)
        return float(norm)

    def current_lrs(self) -> dict[str, float]:
        return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(self.optimizer.param_groups)}

    # ------------------------------------------------------------------------------------------ state
    def _gathered(self, params: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
        import deepspeed

        out = {}
        for n, p in params:
            if self.zero_stage == 3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if self.is_main:
                        out[n] = p.detach().float().cpu().clone()
            elif self.is_main:
                out[n] = p.detach().float().cpu().clone()
        return out

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self._gathered([(n, p) for n, p in self.unwrapped.named_parameters() if p.requires_grad])

    def save_state(self, folder: Path) -> None:
        weights = self.trainable_state_dict()
        if self.is_main:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "trainable.safetensors"))
        self.engine.save_checkpoint(
            str(folder / "ds"), tag="state", save_latest=False, exclude_frozen_parameters=True
        )

    def load_state(self, folder: Path) -> None:
        self.engine.load_checkpoint(
            str(folder / "ds"),
            tag="state",
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )

    def load_trainable(self, state: Mapping[str, torch.Tensor]) -> None:
        import deepspeed

        params = dict(self.unwrapped.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(
                f"checkpoint weights {unknown[:5]} do not exist in this model (another architecture?)"
            )
        with torch.no_grad():
            for n, t in state.items():
                p = params[n]
                if self.zero_stage == 3:
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                        if self.is_main:
                            p.copy_(t.to(p.dtype))
                else:
                    p.copy_(t.to(p.dtype))

    def gather_model(self, adapt: Adapt = None) -> nn.Module | None:
        """The model itself (ZeRO-1/2: every rank holds it) or, under ZeRO-3, an unsharded CPU copy gathered onto
        the main rank (collective); ``None`` on the other ranks."""
        model = self.unwrapped
        if self.zero_stage < 3:
            return model if self.is_main else None
        state = self._gathered(list(model.named_parameters()))
        buffers = {n: b.detach().cpu() for n, b in model.named_buffers() if n in model.state_dict()}
        return rebuild_with(model, {**state, **buffers}, adapt) if self.is_main else None


def register(registries: Any) -> None:
    registries.runners.register_module(name="deepspeed", module=DeepSpeedRunner)
