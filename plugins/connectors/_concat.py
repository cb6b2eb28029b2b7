"""Base of the projector connectors (reference §B.7): towers at the same token count, concatenated on channels."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from cambrian_core.model.connector import Connector, ConnectorOutput

from ._checks import bound_options, check_inputs, dims_from, raise_problems, tower_problems

__all__ = ["ConcatConnector"]


class ConcatConnector(Connector):
    """Concatenate every tower's ``[N_img, token_len, C_t]`` tokens on channels, then apply ``mm_projector``.

    Padding masks are accepted and ignored (the LLM-side attention mask handles padding).
    """

    uses_masks = False  # the LLM-side attention mask handles padding

    #: registered name, used in error messages
    type_name: ClassVar[str] = "projector"
    #: dims for the registry tests: every tower must already be at ``token_len`` tokens
    tiny_dims: ClassVar[dict[str, Any]] = {
        "in_channels": [32, 48],
        "in_token_lens": [16, 16],
        "out_dim": 64,
        "token_len": 16,
    }
    mm_projector: nn.Module

    def __init__(
        self,
        in_channels: list[int],
        in_token_lens: list[int],
        out_dim: int,
        token_len: int,
        options: dict[str, Any] | None = None,
    ) -> None:
        """``options``: a subclass's own keywords, checked by its :meth:`problems` with the dims."""
        problems = self.problems(in_channels, in_token_lens, out_dim, token_len, **(options or {}))
        raise_problems(self.type_name, problems)
        super().__init__(in_channels, in_token_lens, out_dim, token_len)

    @classmethod
    def problems(
        cls,
        in_channels: list[int] | None,
        in_token_lens: list[int] | None,
        out_dim: int | None,
        token_len: int | None,
        **_: Any,
    ) -> list[str]:
        """Cross-field problems; subclasses add their own."""
        out = tower_problems(in_channels, in_token_lens, token_len)
        if token_len is not None:
            for t, n in enumerate(in_token_lens or ()):
                if n != token_len:
                    out.append(
                        f"{cls.type_name} needs every tower at image_token_len tokens; tower {t} has {n}, "
                        f"expected {token_len} — set vision_tower_aux_token_len_list"
                    )
        if out_dim is not None and out_dim <= 0:
            out.append(f"out_dim must be > 0, got {out_dim}")
        return out

    @classmethod
    def check_config(cls, kwargs: dict[str, Any]) -> list[str]:
        """Cross-field problems of a config dict before any weights load."""
        opts = bound_options(cls.__init__, kwargs)
        opts.update(dims_from(kwargs))
        return cls.problems(**opts)

    def forward(
        self, features: list[torch.Tensor], masks: list[torch.Tensor | None] | None = None
    ) -> ConnectorOutput:
        check_inputs(self.type_name, self.in_channels, self.in_token_lens, features, masks)
        x = features[0] if len(features) == 1 else torch.cat(features, dim=-1)
        return ConnectorOutput(self.mm_projector(x))
