"""Shape checks shared by the connector families (used by ``check_config`` and by ``__init__``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cambrian_core.model.encoder import is_square

__all__ = ["bound_options", "check_inputs", "dims_from", "raise_problems", "tower_problems"]

#: the four contract dimensions every connector takes
DIMS = ("in_channels", "in_token_lens", "out_dim", "token_len")


def dims_from(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The contract dimensions present in a config dict (the composed model may fill the others in later)."""
    return {k: kwargs[k] for k in DIMS if kwargs.get(k) is not None}


def tower_problems(
    in_channels: Sequence[int] | None, in_token_lens: Sequence[int] | None, token_len: int | None
) -> list[str]:
    """Problems with the per-tower lists and the output token count: lengths, positivity, perfect squares."""
    out = []
    if in_channels is not None and in_token_lens is not None and len(in_channels) != len(in_token_lens):
        out.append(
            f"in_channels has {len(in_channels)} entries but in_token_lens has {len(in_token_lens)}; "
            "give one hidden size and one token count per vision tower"
        )
    if in_channels is not None:
        if len(in_channels) == 0:
            out.append("a connector needs at least one vision tower (in_channels is empty)")
        out += [f"tower {t} has hidden size {c}; must be > 0" for t, c in enumerate(in_channels) if c <= 0]
    for t, n in enumerate(in_token_lens or ()):
        if not is_square(n):
            out.append(
                f"tower {t} has {n} tokens, which is not a perfect square; set its entry of "
                "vision_tower_aux_token_len_list to a square such as 576 (24x24)"
            )
    if token_len is not None and not is_square(token_len):
        out.append(f"image_token_len {token_len} is not a perfect square (e.g. 576 = 24x24)")
    return out


def raise_problems(owner: str, problems: list[str]) -> None:
    """Raise one ``ValueError`` listing every problem, or return when there are none."""
    if problems:
        raise ValueError(f"{owner}: " + "; ".join(problems))


def bound_options(init: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` completed with ``init``'s defaults (required parameters that are absent become ``None``)."""
    out: dict[str, Any] = {}
    for p in list(inspect.signature(init).parameters.values())[1:]:
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            out[p.name] = kwargs.get(p.name, None if p.default is p.empty else p.default)
    return out


def check_inputs(
    owner: str,
    in_channels: Sequence[int],
    in_token_lens: Sequence[int],
    features: Sequence[Any],
    masks: Sequence[Any] | None,
) -> None:
    """Raise a clear error when the tower features or masks do not match the connector's configuration."""
    if len(features) != len(in_channels):
        raise ValueError(
            f"{owner} was built for {len(in_channels)} towers but got {len(features)} feature maps"
        )
    if masks is not None and len(masks) != len(features):
        raise ValueError(f"{owner}: got {len(masks)} masks for {len(features)} towers (use None for no mask)")
    batch = None
    for t, (f, c, n) in enumerate(zip(features, in_channels, in_token_lens, strict=True)):
        if len(f.shape) != 3 or f.shape[1] != n or f.shape[2] != c:
            raise ValueError(
                f"{owner}: tower {t} features have shape {tuple(f.shape)}, expected [N_img, {n}, {c}]"
            )
        batch = f.shape[0] if batch is None else batch
        if f.shape[0] != batch:
            raise ValueError(f"{owner}: tower {t} has {f.shape[0]} images but tower 0 has {batch}")
        m = masks[t] if masks is not None else None
        if m is not None and (tuple(m.shape) != (batch, n) or m.dtype != torch.bool):
            raise ValueError(
                f"{owner}: tower {t} mask has shape {tuple(m.shape)} and dtype {m.dtype}, expected bool "
                f"[{batch}, {n}] (True = real pixel)"
            )
