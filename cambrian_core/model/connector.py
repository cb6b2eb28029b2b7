"""The connector contract: tower features in, LLM-width image tokens out (plus optional in-LLM samplers).

Images are flattened across the batch before they reach the connector: ``features[t]`` is
``[N_img, N_t, C_t]`` for tower ``t`` and ``masks[t]`` is ``[N_img, N_t]`` (``True`` = real pixel,
``False`` = expand-to-square padding) or ``None``. ``forward`` returns ``[N_img, token_len, out_dim]``
(a square grid, row-major) and an opaque ``state`` that the in-LLM samplers (SVA, reference §B.5) get back.
"""

from __future__ import annotations

import abc
import math
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = ["Connector", "ConnectorOutput"]


class ConnectorOutput(NamedTuple):
    """What a connector returns."""

    tokens: torch.Tensor  #: [N_img, token_len, out_dim]
    state: Any = None  #: handed back to ``llm_sample`` (e.g. projected tower windows + global context)


class Connector(nn.Module, abc.ABC):
    """Base class of every connector.

    Args:
        in_channels: hidden size of each tower, in tower order.
        in_token_lens: token count of each tower (perfect squares), in tower order.
        out_dim: LLM hidden size.
        token_len: number of image tokens handed to the LLM (a perfect square).
    """

    def __init__(
        self, in_channels: list[int], in_token_lens: list[int], out_dim: int, token_len: int
    ) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.in_token_lens = list(in_token_lens)
        self.out_dim = out_dim
        self.token_len = token_len

    @property
    def grid(self) -> int:
        """Side of the output grid."""
        return math.isqrt(self.token_len)

    #: decoder-layer indices after which in-LLM sampler ``k`` runs (``k`` = position in this tuple)
    sampler_layers: tuple[int, ...] = ()
    #: whether ``forward`` reads the padding ``masks`` (``False``: the model does not build them)
    uses_masks: bool = True
    #: whether ``forward`` accepts :class:`~cambrian_core.model.encoder.StagedTokens` in place of a tower's
    #: tensor (the model then asks multi-stage towers for ``forward_staged``); see ``StagedTokens.project``
    accepts_staged: bool = False

    @classmethod
    def config_sampler_layers(cls, kwargs: dict[str, Any]) -> tuple[int, ...]:
        """The ``sampler_layers`` a config would give, without building (checked against the LLM's depth)."""
        return ()

    @classmethod
    def compile_problem(cls) -> str | None:
        """Why ``torch.compile`` of this connector cannot be trusted with this torch (``None``: it can)."""
        return None

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """Extra keywords (besides the four dims above) for a tiny instance; registry tests use it with
        ``in_channels=[32, 48]``, ``in_token_lens=[16, 64]``, ``out_dim=64``, ``token_len=16`` unless the
        class sets ``tiny_dims`` (a dict of those four) to something else."""
        return {}

    @abc.abstractmethod
    def forward(
        self, features: list[torch.Tensor], masks: list[torch.Tensor | None] | None = None
    ) -> ConnectorOutput:
        """Fuse the towers' tokens into ``[N_img, token_len, out_dim]``."""

    def llm_sample(
        self, index: int, hidden: torch.Tensor, state: Any, grid_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """In-LLM sampler ``index``: refine image hidden states ``[N_img, token_len, out_dim]`` in place of the
        decoder's output (returns the new states, residual included). ``grid_mask`` is ``[N_img, token_len]``
        (``True`` = real). Only connectors with ``sampler_layers`` implement it."""
        raise RuntimeError(f"{type(self).__name__} has no in-LLM samplers (sampler_layers is empty)")
