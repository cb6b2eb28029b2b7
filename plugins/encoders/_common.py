"""Shared plumbing of the built-in vision towers: dtype, freezing, local weight files, stage resizing."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cambrian_core.model.encoder import VisionEncoder, is_square, resize_map

__all__ = [
    "DTYPES",
    "PluginEncoder",
    "load_module_weights",
    "read_weights",
    "resize_map",
    "torch_dtype",
]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; unknown names raise with the accepted list."""
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


class PluginEncoder(VisionEncoder):
    """``VisionEncoder`` plus what every built-in tower repeats: finishing (dtype + freeze), eval-mode freezing
    and the config checks shared by all families."""

    #: registered name, used in error messages
    family: str = "encoder"

    def _finish(self, freeze: bool, dtype: str) -> None:
        """Cast to ``dtype`` and apply the freeze state; call at the end of ``__init__``."""
        self.to(torch_dtype(dtype))
        self.set_frozen(freeze)
        self.train(False)

    def train(self, mode: bool = True) -> PluginEncoder:
        """A frozen tower always stays in eval mode (batch-norm statistics and dropout untouched)."""
        return super().train(mode and not self.frozen)

    def set_frozen(self, frozen: bool) -> None:
        super().set_frozen(frozen)
        if frozen:
            super().train(False)

    #: keywords that only name weight sources; dropped when only the architecture is wanted
    weight_keys: tuple[str, ...] = ("checkpoint", "pretrained")

    @classmethod
    def config_dims(cls, kwargs: dict[str, Any]) -> dict[str, int | None]:
        """Width and token count of the tower ``kwargs`` describe, from a weightless build on the meta device
        (no memory, no file read); ``None`` values when the keywords do not build."""
        arch = {k: v for k, v in kwargs.items() if k not in cls.weight_keys}
        try:
            with torch.device("meta"):
                tower = cls(**cls._meta_kwargs(arch))
        except Exception:  # the config check reports the real error when the tower is built
            return super().config_dims(kwargs)
        return {"hidden_size": tower.hidden_size, "token_len": tower.token_len}

    @classmethod
    def _meta_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        return kwargs

    @classmethod
    def check_config(cls, kwargs: Mapping[str, Any]) -> list[str]:
        """Cross-field problems found before any weights load (``cambrian_core.config`` calls this)."""
        problems = []
        token_len = kwargs.get("token_len")
        if token_len is not None and not (isinstance(token_len, int) and is_square(token_len)):
            side = math.isqrt(max(int(token_len), 0)) if isinstance(token_len, int) else 0
            problems.append(
                f"token_len={token_len!r} is not a perfect square; use e.g. {side * side or 1} or "
                f"{(side + 1) ** 2} ({side + 1}x{side + 1})"
            )
        dtype = kwargs.get("dtype", "float32")
        if dtype not in DTYPES:
            problems.append(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        for key in ("path", "checkpoint"):
            value = kwargs.get(key)
            if value is not None and not os.path.exists(os.fspath(value)):
                problems.append(f"{key}={value!r} does not exist (towers load only from local files)")
        return problems


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file: ``.safetensors``, or a torch pickle read with ``weights_only=True``.

    Wrapper dicts (``state_dict`` / ``model`` / ``module``) and the DDP ``module.`` prefix are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} not found; towers load only local files (no hub downloads)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _best_prefix(keys: Iterable[str], wanted: set[str], prefixes: Sequence[str]) -> tuple[str, int]:
    keys = list(keys)
    scored = [
        (sum(k.startswith(p) and k[len(p) :] in wanted for k in keys), -i, p) for i, p in enumerate(prefixes)
    ]
    hits, _, prefix = max(scored)
    return prefix, hits


def load_module_weights(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    prefixes: Sequence[str] = ("",),
    source: str = "checkpoint",
) -> None:
    """Load ``state`` into ``module``: pick the key prefix that matches best (e.g. ``visual.trunk.`` of an
    open_clip checkpoint), require every tensor of ``module`` to be present, ignore the rest (heads, text
    tower, layers this tower pruned)."""
    wanted = set(module.state_dict())
    prefix, hits = _best_prefix(state, wanted, prefixes)
    if hits == 0:
        sample = ", ".join(sorted(state)[:5])
        expect = ", ".join(sorted(wanted)[:5])
        raise ValueError(
            f"{source}: no key matches this tower under the prefixes {list(prefixes)}; the file has e.g. "
            f"[{sample}] but the tower expects e.g. [{expect}]. Is it a checkpoint of this architecture?"
        )
    sub = {
        k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix) :] in wanted
    }
    missing = sorted(wanted - set(sub))
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} tensors of the tower are missing under prefix {prefix!r}, e.g. "
            f"{missing[:5]}; the checkpoint does not match the configured architecture"
        )
    module.load_state_dict(sub, strict=True)
    ignored = len(state) - len(sub)
    if ignored:
        log.info("%s: loaded %d tensors (prefix %r), ignored %d others", source, len(sub), prefix, ignored)
