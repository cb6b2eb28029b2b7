"""``single``: one process on one device (``cpu``, ``cuda`` or ``mps``; ``auto`` picks the best present)."""

from __future__ import annotations

from typing import Any

from cambrian_core.train.runners.base import Runner

__all__ = ["SingleRunner", "register"]


class SingleRunner(Runner):
    """Plain single-device training (the base runner as is).

    Args:
        device: ``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
    """

    name = "single"

    def setup(self) -> None:
        if self.world_size > 1:
            raise RuntimeError(
                f"runner `single` was started in {self.world_size} processes; use runner=dict(type='fsdp') or "
                "type='deepspeed' for several processes, or launch without torchrun"
            )
        super().setup()


def register(registries: Any) -> None:
    registries.runners.register_module(name="single", module=SingleRunner)
