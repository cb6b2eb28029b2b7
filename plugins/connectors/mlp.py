"""``mlpNx_gelu`` and ``linear`` projectors (reference §B.7) on channel-concatenated tower tokens.

``mlpNx_gelu`` is ``Linear(sum C_t -> H)`` followed by ``N-1`` times ``[GELU, Linear(H -> H)]``; ``linear``
is one ``Linear``. Registered: ``mlp_gelu`` (``depth`` keyword), ``mlp2x_gelu``, ``mlp3x_gelu``,
``linear``; :func:`projector_config` turns any Cambrian ``mm_projector_type`` string into a config dict.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from torch import nn

from ._concat import ConcatConnector

__all__ = [
    "LinearProjector",
    "Mlp2xGeluProjector",
    "Mlp3xGeluProjector",
    "MlpGeluProjector",
    "projector_config",
]

_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")


class MlpGeluProjector(ConcatConnector):
    """``Linear`` then ``depth - 1`` x ``[GELU, Linear]`` (state-dict keys ``mm_projector.<i>``)."""

    type_name = "mlp_gelu"

    def __init__(
        self, in_channels: list[int], in_token_lens: list[int], out_dim: int, token_len: int, depth: int = 2
    ) -> None:
        super().__init__(in_channels, in_token_lens, out_dim, token_len, options={"depth": depth})
        layers: list[nn.Module] = [nn.Linear(sum(in_channels), out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.mm_projector = nn.Sequential(*layers)
        self.depth = depth

    @classmethod
    def problems(cls, *dims: Any, depth: int = 2, **kwargs: Any) -> list[str]:
        out = super().problems(*dims, **kwargs)
        if not isinstance(depth, int) or depth < 1:
            out.append(f"{cls.type_name}: depth must be an integer >= 1, got {depth!r}")
        return out


class _FixedDepthMlp(MlpGeluProjector):
    fixed_depth: ClassVar[int] = 2

    def __init__(
        self, in_channels: list[int], in_token_lens: list[int], out_dim: int, token_len: int
    ) -> None:
        super().__init__(in_channels, in_token_lens, out_dim, token_len, depth=self.fixed_depth)


class Mlp2xGeluProjector(_FixedDepthMlp):
    """``mlp2x_gelu``: ``Linear -> GELU -> Linear``."""

    type_name = "mlp2x_gelu"
    fixed_depth = 2


class Mlp3xGeluProjector(_FixedDepthMlp):
    """``mlp3x_gelu``: ``Linear -> GELU -> Linear -> GELU -> Linear``."""

    type_name = "mlp3x_gelu"
    fixed_depth = 3


class LinearProjector(ConcatConnector):
    """One ``Linear(sum C_t -> H)`` (state-dict keys ``mm_projector.weight`` / ``.bias``)."""

    type_name = "linear"

    def __init__(
        self, in_channels: list[int], in_token_lens: list[int], out_dim: int, token_len: int
    ) -> None:
        super().__init__(in_channels, in_token_lens, out_dim, token_len)
        self.mm_projector = nn.Linear(sum(in_channels), out_dim)


def projector_config(mm_projector_type: str, **kwargs: Any) -> dict[str, Any]:
    """Connector config dict for a Cambrian ``mm_projector_type`` (``mlp4x_gelu`` -> ``mlp_gelu``, depth 4)."""
    match = _MLP_RE.match(mm_projector_type)
    if match:
        return {"type": "mlp_gelu", "depth": int(match.group(1)), **kwargs}
    return {"type": mm_projector_type, **kwargs}


def register(registries: Any) -> None:
    registries.connectors.register_module(name="mlp_gelu", module=MlpGeluProjector)
    registries.connectors.register_module(name="mlp2x_gelu", module=Mlp2xGeluProjector)
    registries.connectors.register_module(name="mlp3x_gelu", module=Mlp3xGeluProjector)
    registries.connectors.register_module(name="linear", module=LinearProjector)
