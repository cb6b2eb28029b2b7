"""Optimiser parameter groups with per-module learning rates, the warmup + cosine schedule, lr scaling.

``lr_groups`` maps a module prefix (``"connector.mm_projector"``) or a glob (``"connector.vision_sampler*"``) to
its learning rate; every trainable parameter goes to the group of its longest matching key (or the base lr),
split into weight-decay and no-decay halves (biases, norms and other 1-D tensors never decay), as in
reference §C.4 but with any number of special lrs.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "build_optimizer",
    "build_scheduler",
    "lr_lambda",
    "param_groups",
    "scaled_lr",
]

_OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD}


def scaled_lr(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """The seed recipe's rule for other global batch sizes: ``base_lr * sqrt(batch_size / base_batch_size)``."""
    if batch_size < 1 or base_batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {base_batch_size}")
    return base_lr * math.sqrt(batch_size / base_batch_size)


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def _matches(name: str, key: str) -> bool:
    if any(c in key for c in "*?["):
        return fnmatch.fnmatchcase(name, key) or fnmatch.fnmatchcase(name, key + ".*")
    return key == "" or name == key or name.startswith(key + ".")


def _matching_prefix(name: str, prefixes: Iterable[str]) -> str | None:
    hits = [p for p in prefixes if _matches(name, p)]
    return max(hits, key=len) if hits else None


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    lr_groups: Mapping[str, float] | None = None,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimiser groups for the trainable parameters of ``named_params``.

    Each group carries ``name`` (``"<prefix or base>/<decay|no_decay>"``), ``lr``, ``weight_decay`` and
    ``param_names``. Frozen parameters are skipped; empty groups are dropped.

    Raises:
        ValueError: a prefix of ``lr_groups`` matches no trainable parameter (a typo would otherwise
            silently train that module at the base lr, or not at all).
    """
    lr_groups = dict(lr_groups or {})
    buckets: dict[tuple[str, bool], list[tuple[str, nn.Parameter]]] = {}
    used: set[str] = set()
    for name, p in named_params:
        if not p.requires_grad:
            continue
        prefix = _matching_prefix(name, lr_groups)
        if prefix is not None:
            used.add(prefix)
        buckets.setdefault((prefix or "", _no_decay(name, p)), []).append((name, p))
    unused = sorted(set(lr_groups) - used)
    if unused:
        raise ValueError(
            f"optim.lr_groups prefixes {unused} match no trainable parameter; check the module names "
            f"(`cambrian train --dry-run` lists the trainable modules) or the stage's freezing"
        )
    groups = []
    for (prefix, no_decay), items in sorted(buckets.items()):
        groups.append(
            {
                "name": f"{prefix or 'base'}/{'no_decay' if no_decay else 'decay'}",
                "params": [p for _, p in items],
                "param_names": [n for n, _ in items],
                "lr": lr_groups.get(prefix, lr) if prefix else lr,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        )
    return groups


def build_optimizer(
    groups: list[dict[str, Any]],
    type: str = "AdamW",
    betas: tuple[float, float] | list[float] = (0.9, 0.999),
    eps: float = 1e-8,
    **extra: Any,
) -> torch.optim.Optimizer:
    """A torch optimiser over ``groups`` (``param_names`` is kept in each group for logging and checks)."""
    if type not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer `{type}`; choose one of {sorted(_OPTIMIZERS)}")
    if not any(g["params"] for g in groups):
        raise ValueError("no trainable parameters: the stage froze everything (check `stage` and `lora`)")
    cls = _OPTIMIZERS[type]
    kwargs: dict[str, Any] = dict(extra)
    if type in ("AdamW", "Adam"):
        kwargs.update(betas=tuple(betas), eps=eps)
    # each group keeps its own lr; the constructor's lr is only a default
    return cls(groups, lr=groups[0]["lr"], **kwargs)


def lr_lambda(
    step: int, total_steps: int, warmup_steps: int, kind: str = "cosine", min_ratio: float = 0.0
) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine / linear decay or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1.0 - progress)
    raise ValueError(f"unknown scheduler `{kind}`; choose cosine, linear or constant")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_ratio: float = 0.0,
    kind: str = "cosine",
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup (``ceil(warmup_ratio * total_steps)`` steps) followed by ``kind`` decay, one step per update."""
    lr_lambda(0, total_steps, 0, kind)  # fail on a bad `kind` now, not at the first step
    warmup = math.ceil(warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_steps, warmup, kind, min_ratio)
    )
