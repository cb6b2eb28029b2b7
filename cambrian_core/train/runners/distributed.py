"""Helpers shared by the multi-process runners: process group start, reductions, barriers."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["all_reduce", "barrier", "init_process_group", "pick_backend"]


def pick_backend(device: torch.device, backend: str = "auto") -> str:
    """``nccl`` on CUDA, ``gloo`` on CPU (or what was asked for)."""
    if backend != "auto":
        return backend
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(device: torch.device, backend: str = "auto", timeout_s: int = 1800) -> None:
    """Join the process group that torchrun (or another launcher) described in the environment."""
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"a distributed runner needs the launcher's environment ({', '.join(missing)} not set); start with "
            "`cambrian train CONFIG --launcher torchrun --nproc N` or `torchrun --nproc_per_node N -m "
            "cambrian_core.train CONFIG`; for one process use runner=dict(type='single')"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        pick_backend(device, backend),
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def all_reduce(values: torch.Tensor, device: torch.device, op: str = "sum") -> torch.Tensor:
    """Reduce a small tensor over all ranks and return it on the CPU."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "mean": dist.ReduceOp.SUM}
    t = values.detach().to(device if dist.get_backend() == "nccl" else "cpu", dtype=torch.float64).clone()
    dist.all_reduce(t, op=ops[op])
    if op == "mean":
        t /= dist.get_world_size()
    return t.cpu()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
