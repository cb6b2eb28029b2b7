"""SVA, the Spatial Vision Aggregator (reference §B.4) and its in-LLM samplers (§B.5).

Every tower's tokens are projected to a common width C; learned queries on a ``q x q`` grid each attend
jointly over their ``r_t x r_t`` window of every tower (``r_t = s_t / q``), conditioned on a global context;
the groups' outputs are resized to the final grid, concatenated and projected to the LLM width. With
``connector_only=False`` one-layer samplers refine the image hidden states inside the LLM after the
decoder layers ``start + k * stride``.

State-dict names follow Cambrian-1 (``mm_projector_aux_<t>``, ``vision_query``, ``vision_sampler_<g>``,
``mm_projector``, ``vision_sampler_layers``), so a released connector loads after stripping ``model.``.
How the attention is batched is described in :mod:`cambrian_plugins.connectors._sva_layers`.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cambrian_core.model.connector import Connector, ConnectorOutput
from cambrian_core.model.encoder import StagedTokens, is_square

from ._checks import bound_options, check_inputs, dims_from, raise_problems, tower_problems
from ._sva_layers import LN_EPS, TowerWindows, VisionTokenSampler, make_windows

__all__ = ["SVAConnector", "SVAState", "sampler_schedule"]

GLOBAL_CONTEXTS = ("mean", "masked_mean")

# With padding masks, windows (and their shared row moments) are made outside the compiled graphs: traced
# together with the layers, inductor (torch 2.14, CPU) returned wrong gradients for a masked connector of
# depth >= 2 (up to 15 % off on the window towers' projections and the second layer's position embeddings;
# the forward, eager and the `aot_eager` backend are right; without masks the gradients are right too).
# The graph break cost the compiled Cambrian-8B fp32 forward 675 vs 609 ms (step 1687 vs 1661 ms) in one
# measurement, so unmasked inputs keep one graph.
_windows_eager = torch.compiler.disable(make_windows)


def _torch_release() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


class SVAState(NamedTuple):
    """What the in-LLM samplers reuse from one connector forward (computed once, shared by all samplers)."""

    windows: TowerWindows  #: projected tower maps in final-grid windows (+ padding masks)
    context: torch.Tensor  #: global context ``[N_img, C]``


def sampler_schedule(num: int, start: int, stride: int) -> tuple[int, ...]:
    """Decoder-layer indices after which in-LLM sampler ``k`` runs: ``start + k * stride`` for ``k < num``."""
    return tuple(start + k * stride for k in range(num))


def _query_list(query_num_list: list[int] | str | None) -> list[int] | None:
    """``query_num_list`` as a list (Cambrian-1 passes it as a JSON string such as ``'[576]'``)."""
    if isinstance(query_num_list, str):
        query_num_list = json.loads(query_num_list)
    return None if query_num_list is None else [int(q) for q in query_num_list]


def _sva_problems(
    in_channels: list[int] | None,
    in_token_lens: list[int] | None,
    token_len: int | None,
    vision_hidden_size: int,
    num_query_group: int,
    query_num_list: list[int] | str | None,
    connector_depth: int,
    connector_only: bool,
    num_of_vision_sampler_layers: int,
    start_of_vision_sampler_layers: int,
    stride_of_vision_sampler_layers: int,
    num_heads: int,
    global_context: str,
    **_: Any,
) -> list[str]:
    out = tower_problems(in_channels, in_token_lens, token_len)
    if num_heads <= 0 or vision_hidden_size <= 0 or vision_hidden_size % num_heads:
        out.append(
            f"vision_hidden_size {vision_hidden_size} is not divisible by num_heads {num_heads}; pick "
            "num_heads dividing it (e.g. 16 heads of 64 for 1024)"
        )
    if connector_depth < 1:
        out.append(f"connector_depth must be >= 1, got {connector_depth}")
    if global_context not in GLOBAL_CONTEXTS:
        out.append(f"global_context must be one of {', '.join(GLOBAL_CONTEXTS)}, got {global_context!r}")
    queries = _query_list(query_num_list)
    if queries is None and token_len is not None:
        queries = [token_len] * num_query_group
    if queries is not None and len(queries) != num_query_group:
        out.append(
            f"query_num_list has {len(queries)} entries but num_query_group is {num_query_group}; "
            "give one query count per group"
        )
    sides = {}  # grid side -> what it is, for the window checks
    for g, qn in enumerate(queries or ()):
        if not is_square(qn):
            out.append(f"query_num_list[{g}] = {qn} is not a perfect square (e.g. 576 = 24x24)")
        else:
            sides.setdefault(math.isqrt(qn), f"query group {g} ({qn} queries)")
    if not connector_only:
        if num_of_vision_sampler_layers < 0 or start_of_vision_sampler_layers < 0:
            out.append("num_of_vision_sampler_layers and start_of_vision_sampler_layers must be >= 0")
        if stride_of_vision_sampler_layers < 1:
            out.append(f"stride_of_vision_sampler_layers must be >= 1, got {stride_of_vision_sampler_layers}")
        if token_len is not None and is_square(token_len) and num_of_vision_sampler_layers > 0:
            sides.setdefault(math.isqrt(token_len), f"the in-LLM samplers' final grid ({token_len} tokens)")
    for t, n in enumerate(in_token_lens or ()):
        if not is_square(n):
            continue
        s = math.isqrt(n)
        for q, what in sides.items():
            if s % q:
                out.append(
                    f"tower {t} has a {s}x{s} grid ({n} tokens) that {what} on a {q}x{q} grid cannot split "
                    f"into windows: window side {s}/{q} is not an integer; make that tower's entry of "
                    f"vision_tower_aux_token_len_list a square whose side is a multiple of {q}, or change "
                    "query_num_list / image_token_len"
                )
    return out


class SVAConnector(Connector):
    """Spatial Vision Aggregator with optional in-LLM samplers.

    A tower may come as :class:`StagedTokens` (``accepts_staged``): its first projection then runs on each
    stage's own grid where that is smaller, and the 5760-wide 96x96 ConvNeXt token matrix is never built.

    Defaults are Cambrian-1's training-argument defaults; the Cambrian-8B recipe uses
    ``connector_depth=3, connector_only=False, start_of_vision_sampler_layers=0,
    stride_of_vision_sampler_layers=3``.

    Args:
        in_channels, in_token_lens, out_dim, token_len: see :class:`Connector` (``token_len`` = f*f).
        vision_hidden_size: SVA width C.
        num_query_group: number of query groups G.
        query_num_list: queries per group (perfect squares; a list or a JSON string such as ``'[576]'``);
            default ``[token_len] * G``.
        connector_depth: cross-attention layers per group.
        connector_only: ``True`` = no in-LLM samplers.
        num_of_vision_sampler_layers, start_of_vision_sampler_layers, stride_of_vision_sampler_layers:
            in-LLM sampler schedule (see :func:`sampler_schedule`).
        num_heads: attention heads (reference: 16; must divide C).
        global_context: ``"mean"`` (reference: mean of the first tower's projected tokens, padding
            included) or ``"masked_mean"`` (mean over that tower's real tokens).
        pos_embed_std: init std of the window position embeddings (reference: 1.0).
    """

    accepts_staged = True

    def __init__(
        self,
        in_channels: list[int],
        in_token_lens: list[int],
        out_dim: int,
        token_len: int,
        vision_hidden_size: int = 1024,
        num_query_group: int = 1,
        query_num_list: list[int] | str | None = None,
        connector_depth: int = 1,
        connector_only: bool = True,
        num_of_vision_sampler_layers: int = 10,
        start_of_vision_sampler_layers: int = 16,
        stride_of_vision_sampler_layers: int = 1,
        num_heads: int = 16,
        global_context: str = "mean",
        pos_embed_std: float = 1.0,
    ) -> None:
        opts = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        raise_problems("sva", _sva_problems(**opts))
        super().__init__(in_channels, in_token_lens, out_dim, token_len)
        c = self.vision_hidden_size = vision_hidden_size
        self.global_context = global_context
        self.query_sides = [
            math.isqrt(q) for q in (_query_list(query_num_list) or [token_len] * num_query_group)
        ]
        tower_sides = [math.isqrt(n) for n in in_token_lens]
        for t, ch in enumerate(in_channels):
            proj = nn.Sequential(nn.Linear(ch, c), nn.GELU(), nn.Linear(c, c), nn.LayerNorm(c, eps=LN_EPS))
            setattr(self, f"mm_projector_aux_{t}", proj)
        self.vision_query = nn.Parameter(torch.randn(len(self.query_sides), c) / math.sqrt(c))
        for g, q in enumerate(self.query_sides):
            windows = [s // q for s in tower_sides]
            sampler = VisionTokenSampler(c, c, windows, connector_depth, num_heads, pos_embed_std)
            setattr(self, f"vision_sampler_{g}", sampler)
        self.mm_projector = nn.Sequential(
            nn.Linear(c * len(self.query_sides), out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )
        if not connector_only and num_of_vision_sampler_layers > 0:
            final = [s // self.grid for s in tower_sides]
            self.vision_sampler_layers = nn.ModuleList(
                VisionTokenSampler(out_dim, c, final, 1, num_heads, pos_embed_std)
                for _ in range(num_of_vision_sampler_layers)
            )
            self.sampler_layers = sampler_schedule(
                num_of_vision_sampler_layers, start_of_vision_sampler_layers, stride_of_vision_sampler_layers
            )

    @classmethod
    def config_sampler_layers(cls, kwargs: dict[str, Any]) -> tuple[int, ...]:
        opts = bound_options(cls.__init__, kwargs)
        num = opts.get("num_of_vision_sampler_layers", 0)
        if opts.get("connector_only", True) or not isinstance(num, int) or num <= 0:
            return ()
        return sampler_schedule(
            num, opts.get("start_of_vision_sampler_layers", 0), opts.get("stride_of_vision_sampler_layers", 1)
        )

    @classmethod
    def check_config(cls, kwargs: dict[str, Any]) -> list[str]:
        """Cross-field problems (squares, window divisibility, heads) before any weights load."""
        opts = bound_options(cls.__init__, kwargs)
        opts.update(dims_from(kwargs))
        return _sva_problems(**opts)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {
            "vision_hidden_size": 32,
            "num_heads": 4,
            "connector_depth": 2,
            "connector_only": False,
            "num_of_vision_sampler_layers": 2,
            "start_of_vision_sampler_layers": 0,
            "stride_of_vision_sampler_layers": 1,
        }

    @classmethod
    def compile_problem(cls) -> str | None:
        if _torch_release() >= (2, 13):
            return None
        return (
            f"torch.compile of the SVA connector returns wrong gradients with padding masks on torch "
            f"{torch.__version__} (measured on 2.11: the window towers' projections and window position embeddings "
            "off by 0.5-15 %; right on 2.13 and 2.14); upgrade torch to >= 2.13 or train without compiling it"
        )

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``nn.Module.compile`` for the connector's forward and for each in-LLM sampler (``llm_sample`` calls
        them directly, not through ``forward``). Refused on a torch whose compiled gradients are wrong."""
        problem = self.compile_problem()
        if problem is not None:
            raise RuntimeError(problem)
        super().compile(*args, **kwargs)
        for sampler in getattr(self, "vision_sampler_layers", ()):
            sampler.compile(*args, **kwargs)

    def project_towers(self, features: list[torch.Tensor | StagedTokens]) -> list[torch.Tensor]:
        """Per-tower ``Linear -> GELU -> Linear -> LayerNorm`` to C: ``[N_img, N_t, C]`` each (a staged tower's
        first Linear runs on each stage's smaller grid, see ``StagedTokens.project``)."""
        out = []
        for t, f in enumerate(features):
            proj = getattr(self, f"mm_projector_aux_{t}")
            if isinstance(f, StagedTokens):
                x = f.project(proj[0])
                for layer in list(proj)[1:]:
                    x = layer(x)
                out.append(x)
            else:
                out.append(proj(f))
        return out

    def _context(self, first: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.global_context == "mean" or mask is None:
            return first.mean(dim=1)
        weight = mask.to(first.dtype).unsqueeze(-1)
        count = weight.sum(dim=1)
        masked = (first * weight).sum(dim=1) / count.clamp(min=1)
        return torch.where(count > 0, masked, first.mean(dim=1))  # all-padding image: plain mean

    def forward(
        self, features: list[torch.Tensor | StagedTokens], masks: list[torch.Tensor | None] | None = None
    ) -> ConnectorOutput:
        check_inputs("sva", self.in_channels, self.in_token_lens, features, masks)
        masked = masks is not None and any(m is not None for m in masks)
        make = _windows_eager if masked else make_windows
        maps = self.project_towers(features)
        context = self._context(maps[0], masks[0] if masks is not None else None)
        windows: dict[int, TowerWindows] = {}
        groups = []
        for g, side in enumerate(self.query_sides):
            if side not in windows:  # groups on the same grid share one windowing
                windows[side] = make(maps, masks, side)
            win = windows[side]
            query = self.vision_query[g].view(1, 1, -1).expand(maps[0].shape[0], 1, -1)
            y = getattr(self, f"vision_sampler_{g}")(query, context, win)
            if side != self.grid:  # bilinear resize of the q x q grid to the final grid, in fp32
                grid = y.transpose(1, 2).reshape(y.shape[0], -1, side, side)
                grid = grid.to(torch.promote_types(grid.dtype, torch.float32))
                grid = F.interpolate(grid, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
                y = grid.flatten(2).transpose(1, 2).to(y.dtype)
            groups.append(y)
        tokens = self.mm_projector(torch.cat(groups, dim=-1))
        state = None
        if self.sampler_layers:
            final = windows[self.grid] if self.grid in windows else make(maps, masks, self.grid)
            state = SVAState(final, context)
        return ConnectorOutput(tokens, state)

    def llm_sample(
        self, index: int, hidden: torch.Tensor, state: Any, grid_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Run in-LLM sampler ``index`` on image hidden states ``[N_img, f*f, out_dim]`` (residual included).

        Cells with ``grid_mask`` False (expand-to-square padding) are returned unchanged.
        """
        if not self.sampler_layers:
            raise RuntimeError("this SVA connector has no in-LLM samplers (connector_only=True)")
        if not 0 <= index < len(self.sampler_layers):
            raise IndexError(f"in-LLM sampler {index} does not exist; there are {len(self.sampler_layers)}")
        if not isinstance(state, SVAState):
            raise TypeError("llm_sample needs the `state` returned by this connector's forward()")
        n_img = state.context.shape[0]
        if tuple(hidden.shape) != (n_img, self.token_len, self.out_dim):
            raise ValueError(
                f"llm_sample expects hidden states [{n_img}, {self.token_len}, {self.out_dim}], "
                f"got {tuple(hidden.shape)}"
            )
        out = self.vision_sampler_layers[index](hidden, state.context, state.windows).to(hidden.dtype)
        if grid_mask is not None:
            out = torch.where(grid_mask.unsqueeze(-1), out, hidden)
        return out


def register(registries: Any) -> None:
    registries.connectors.register_module(name="sva", module=SVAConnector)
