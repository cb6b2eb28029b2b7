"""``fsdp``: PyTorch FSDP2 (``fully_shard``) over torchrun processes, one device each (gloo on CPU).

Each decoder layer of the LLM and each vision tower is its own shard unit, and the root (connector, newline,
embeddings, head) is the last one, so at most one layer's full weights are gathered at a time. Multi-node
works through torchrun's rendezvous (``--nnodes``, ``--rdzv-endpoint``); see docs/training.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cambrian_core.train.runners.base import Adapt, Runner, rebuild_with
from cambrian_core.train.runners.distributed import all_reduce, barrier, init_process_group

__all__ = ["FSDPRunner", "register"]


class FSDPRunner(Runner):
    """Fully sharded data parallel training (FSDP2).

    Args:
        device: ``auto`` (``cuda:<local_rank>`` when CUDA is present, else ``cpu``), or explicit.
        backend: process-group backend (``auto``: nccl on CUDA, gloo on CPU).
        reshard_after_forward: free gathered weights after each unit's forward (ZeRO-3-like; ``False`` keeps
            them until backward, ZeRO-2-like, faster and hungrier).
        shard_towers: make each vision tower a shard unit of its own.
    """

    name = "fsdp"

    def __init__(
        self,
        device: str = "auto",
        backend: str = "auto",
        reshard_after_forward: bool = True,
        shard_towers: bool = True,
    ) -> None:
        super().__init__(device)
        self.backend = backend
        self.reshard_after_forward = reshard_after_forward
        self.shard_towers = shard_towers

    def setup(self) -> None:
        super().setup()
        if self.device.type == "mps":
            raise RuntimeError("runner `fsdp` does not run on MPS; use runner=dict(type='single')")
        init_process_group(self.device, self.backend)

    def barrier(self) -> None:
        barrier()

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return all_reduce(values, self.device, op)

    def teardown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            # ranks leave together: a rank that tore down gloo while rank 0 was still writing its loss curve
            # was seen to abort at exit ("terminate called without an active exception")
            barrier()
            dist.destroy_process_group()

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        model = model.to(self.device)
        kw: dict[str, Any] = {"reshard_after_forward": self.reshard_after_forward}
        if self.shard_towers:
            for tower in model.towers:
                fully_shard(tower, **kw)
        for layer in model.llm.decoder_layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        return model

    def backward(self, loss: torch.Tensor, last_micro: bool = True) -> None:
        # reduce-scatter gradients only on the micro-batch that ends an update
        self.model.set_requires_gradient_sync(last_micro)
        super().backward(loss, last_micro)

    # ------------------------------------------------------------------------------------------ state
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p  # collective: every rank calls it
                if self.is_main:
                    out[n] = full.detach().cpu().clone()
        return out

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        params = dict(self.model.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(
                f"checkpoint weights {unknown[:5]} do not exist in this model (another architecture?)"
            )
        set_model_state_dict(
            self.model, dict(state), options=StateDictOptions(full_state_dict=True, strict=False)
        )

    def save_state(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        weights = self.trainable_state_dict()
        optim = get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.is_main:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "trainable.safetensors"))
            torch.save(
                {
                    "optimizer": optim,
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                },
                folder / "optimizer.pt",
            )

    def load_state(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        self.load_trainable(load_file(str(folder / "trainable.safetensors")))
        state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        set_optimizer_state_dict(
            self.model, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):  # fp16: the loss scale goes on where it was
            self.scaler.load_state_dict(state["scaler"])

    def gather_model(self, adapt: Adapt = None) -> nn.Module | None:
        """An unsharded CPU copy of the model on the main rank (collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return rebuild_with(self.model, state, adapt) if self.is_main else None


def register(registries: Any) -> None:
    registries.runners.register_module(name="fsdp", module=FSDPRunner)
