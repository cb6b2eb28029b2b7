"""``identity`` connector (reference §B.7): channel-concatenated tower tokens handed to the LLM unchanged."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ._concat import ConcatConnector

__all__ = ["IdentityConnector"]


class IdentityConnector(ConcatConnector):
    """No parameters: the towers' hidden sizes must add up to the LLM width."""

    type_name = "identity"
    tiny_dims: ClassVar[dict[str, Any]] = {
        "in_channels": [32, 48],
        "in_token_lens": [16, 16],
        "out_dim": 80,
        "token_len": 16,
    }

    def __init__(
        self, in_channels: list[int], in_token_lens: list[int], out_dim: int, token_len: int
    ) -> None:
        super().__init__(in_channels, in_token_lens, out_dim, token_len)
        self.mm_projector = nn.Identity()

    @classmethod
    def problems(cls, in_channels: Any = None, in_token_lens: Any = None, out_dim: Any = None, token_len: Any = None,
                 **kwargs: Any) -> list[str]:  # fmt: skip
        out = super().problems(in_channels, in_token_lens, out_dim, token_len, **kwargs)
        if in_channels is not None and out_dim is not None and sum(in_channels) != out_dim:
            widths = " + ".join(str(c) for c in in_channels)
            out.append(
                f"identity needs the towers' hidden sizes to add up to the LLM width: {widths} = "
                f"{sum(in_channels)} != {out_dim}; use mlp2x_gelu or linear to change width"
            )
        return out


def register(registries: Any) -> None:
    registries.connectors.register_module(name="identity", module=IdentityConnector)
