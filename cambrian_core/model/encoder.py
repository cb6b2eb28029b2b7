"""The vision-encoder contract: what the composed model needs from a tower, nothing more.

A concrete encoder (plugin) implements ``forward_features`` and sets ``hidden_size``, ``image_size``,
``native_grid``, ``image_mean`` / ``image_std``. The base class owns the rest: the image transform
(expand-to-square with the mean colour, resize, normalise), interpolation of the native token grid to the
requested square ``token_len`` (bilinear, in fp32), freezing, dtype and the feature-cache key.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

__all__ = [
    "StagedTokens",
    "VisionEncoder",
    "expand_to_square",
    "interpolate_tokens",
    "is_square",
    "resize_map",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


def is_square(n: int) -> bool:
    """``True`` when ``n`` is a perfect square (token counts must be)."""
    return n > 0 and math.isqrt(n) ** 2 == n


def expand_to_square(image: Image.Image, fill: Sequence[int]) -> Image.Image:
    """Pad ``image`` to a centred square with colour ``fill`` (LLaVA's ``expand2square``)."""
    image = image.convert("RGB")
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(c) for c in fill))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def interpolate_tokens(x: torch.Tensor, token_len: int, antialias: bool = True) -> torch.Tensor:
    """Resize ``[B, N, C]`` square-grid tokens to ``token_len`` tokens (bilinear, fp32, antialiased when shrinking
    unless ``antialias=False``, Cambrian-1's plain bilinear)."""
    b, n, c = x.shape
    if n == token_len:
        return x
    src, dst = math.isqrt(n), math.isqrt(token_len)
    if src * src != n or dst * dst != token_len:
        raise ValueError(f"cannot interpolate {n} tokens to {token_len}: both must be perfect squares")
    grid = x.transpose(1, 2).reshape(b, c, src, src).float()
    out = F.interpolate(
        grid, size=(dst, dst), mode="bilinear", align_corners=False, antialias=antialias and dst < src
    )
    return out.reshape(b, c, token_len).transpose(1, 2).to(x.dtype)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16 / fp16 / fp32; fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def _resize_nchw(x: torch.Tensor, side: int, antialias: bool = True) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, side, side]`` (bilinear in fp32 or wider, antialiased when shrinking unless
    ``antialias=False``), in the input dtype."""
    h, w = x.shape[-2:]
    if (h, w) == (side, side):
        return x
    shrink = antialias and (side < h or side < w)
    out = F.interpolate(
        x.to(_wide(x.dtype)), size=(side, side), mode="bilinear", align_corners=False, antialias=shrink
    )
    return out.to(x.dtype)


def resize_map(x: torch.Tensor, side: int, antialias: bool = True) -> torch.Tensor:
    """``[B, C, H, W]`` feature map -> ``[B, side*side, C]`` tokens (bilinear in fp32 or wider, antialiased
    when shrinking unless ``antialias=False``), returned in the input dtype."""
    return _resize_nchw(x, side, antialias).flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class StagedTokens:
    """A multi-stage tower's output before its stages are brought to one grid and concatenated.

    ``parts`` are the stages in channel order as ``[B, C_k, h_k, w_k]`` maps: stages larger than the output
    grid already shrunk to it (adjacent ones concatenated), smaller ones still on their own grid.
    :meth:`tokens` gives exactly what the tower's ``forward`` returns. A connector whose first operation is
    a ``Linear`` calls :meth:`project` instead: bilinear enlarging is linear with weights summing to one, so
    it commutes with the projection (bias included), and the small stages are projected before they are
    enlarged. For ConvNeXt-XXL at 1024 px into 96x96 tokens that projects the stride-16 and stride-32 stages
    on 64x64 and 32x32 grids (41 instead of 109 GFLOP for the 5760 -> 1024 projection), and the 9216 x 5760
    token matrix, whose channel-to-token transposition alone costs more than the projection on a CPU, is
    never built.
    """

    parts: tuple[torch.Tensor, ...]  #: per stage (or run of adjacent output-grid stages): ``[B, C_k, h, w]``
    side: int  #: output grid side

    @classmethod
    def from_maps(cls, maps: Sequence[torch.Tensor], side: int, antialias: bool = True) -> StagedTokens:
        """Stage maps ``[B, C_k, H_k, W_k]``: those not within the output grid are resized to it (as
        ``resize_map`` does), adjacent output-grid maps are concatenated, smaller ones kept as they are."""
        parts: list[torch.Tensor] = []
        for m in maps:
            h, w = m.shape[-2:]
            if h > side or w > side:
                m = _resize_nchw(m, side, antialias)
            if parts and m.shape[-2:] == parts[-1].shape[-2:] == (side, side):
                parts[-1] = torch.cat([parts[-1], m], dim=1)
            else:
                parts.append(m)
        return cls(tuple(parts), side)

    @classmethod
    def cat(cls, items: Sequence[StagedTokens]) -> StagedTokens:
        """The images of several ``StagedTokens`` of one layout in one batch (``torch.cat`` on images)."""
        if not items:
            raise ValueError("StagedTokens.cat needs at least one item")
        first = items[0]
        for it in items[1:]:
            if it.side != first.side or it.layout != first.layout:
                raise ValueError(
                    f"cannot batch StagedTokens of layouts {first.layout} (side {first.side}) and {it.layout} "
                    f"(side {it.side})"
                )
        return cls(tuple(torch.cat(ps) for ps in zip(*(it.parts for it in items), strict=True)), first.side)

    @property
    def layout(self) -> tuple[tuple[int, int, int], ...]:
        """``(channels, height, width)`` of every part (the per-image shape, without the batch)."""
        return tuple((int(p.shape[1]), int(p.shape[2]), int(p.shape[3])) for p in self.parts)

    @property
    def shape(self) -> torch.Size:
        """``[B, side*side, sum C_k]``, the shape of :meth:`tokens`."""
        b = self.parts[0].shape[0]
        return torch.Size((b, self.side * self.side, sum(p.shape[1] for p in self.parts)))

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def to(self, *args: Any, **kwargs: Any) -> StagedTokens:
        """``Tensor.to`` applied to every part."""
        return StagedTokens(tuple(p.to(*args, **kwargs) for p in self.parts), self.side)

    def pin_memory(self) -> StagedTokens:
        """Every part in page-locked memory (the DataLoader's ``pin_memory=True`` calls this)."""
        return StagedTokens(tuple(p.pin_memory() for p in self.parts), self.side)

    def tokens(self) -> torch.Tensor:
        """Every stage on the output grid, concatenated on channels: ``[B, side*side, sum C_k]``."""
        return torch.cat([resize_map(p, self.side) for p in self.parts], dim=-1)

    # Left to eager kernels under torch.compile: inductor's own bilinear enlarging (and its backward) made a
    # compiled SVA at the Cambrian-8B shape slower than eager on CPU (fp32 forward 685 vs 592 ms, training step
    # 2474 vs 1532 ms); with this one graph break the compiled connector beats eager.
    @torch.compiler.disable
    def project(self, linear: nn.Linear) -> torch.Tensor:
        """``linear(self.tokens())`` up to rounding, small stages projected on their own grid, then enlarged.

        Everything stays in the product's dtype (e.g. bf16 under autocast): products accumulate in fp32, and
        so does bilinear enlarging of bf16 / fp16 on CPU and CUDA. The bias joins the coarsest stage's product
        before it is enlarged, and the output-grid stages' products accumulate into the enlarged sum inside
        their GEMM (``beta = 1``): one full-size add in all, where adding each product and the bias costs
        ~5 ms per add at the Cambrian-8B shape in bf16 on CPU."""
        widths = [int(p.shape[1]) for p in self.parts]
        if linear.in_features != sum(widths):
            raise ValueError(
                f"cannot project stages of widths {widths} (sum {sum(widths)}) with a Linear of "
                f"{linear.in_features} inputs"
            )
        if not self.parts:
            raise ValueError("StagedTokens holds no stages")
        weights = torch.split(linear.weight, widths, dim=1)
        small = [k for k, p in enumerate(self.parts) if tuple(p.shape[-2:]) != (self.side, self.side)]
        with_bias = min(small, key=lambda k: self.parts[k].shape[-2:].numel()) if small else 0
        total: torch.Tensor | None = None
        for k in small:
            p = self.parts[k]
            h, v = p.shape[-2:]
            # channel-major rows as a transposed view: the GEMM reads them in place (an explicit transpose of
            # a large map is slower than the product)
            part = F.linear(p.flatten(2).transpose(1, 2), weights[k], linear.bias if k == with_bias else None)
            # the product viewed channels-last (no copy); the CPU kernel enlarges it in that layout
            grid = part.unflatten(1, (h, v)).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(self.side, self.side), mode="bilinear", align_corners=False)
            part = grid.permute(0, 2, 3, 1).flatten(1, 2)
            total = part if total is None else total.add_(part)  # total is this method's own product
        for k, p in enumerate(self.parts):
            if k in small:
                continue
            rows = p.flatten(2).transpose(1, 2)
            if total is None:
                total = F.linear(rows, weights[k], linear.bias if k == with_bias else None)
            elif total.shape[0] == 1:  # one image: a plain GEMM on the 2-D matrices
                total = torch.addmm(total[0], rows[0], weights[k].t()).unsqueeze(0)
            else:
                total = torch.baddbmm(total, rows, weights[k].t().expand(total.shape[0], -1, -1))
        assert total is not None
        return total


class VisionEncoder(nn.Module, abc.ABC):
    """Base class of every vision tower.

    Args:
        token_len: square number of output tokens (``vision_tower_aux_token_len_list`` entry); ``None``
            keeps the native grid.
        freeze: run under ``no_grad`` and exclude from training unless a stage unfreezes it.
        dtype: parameter / compute dtype of the tower (``"float32"``, ``"bfloat16"``, ``"float16"``).

    Subclasses set ``hidden_size``, ``image_size``, ``native_grid``, ``image_mean``, ``image_std`` in their
    ``__init__`` and implement ``forward_features(pixels) -> [B, native_grid**2, hidden_size]``.
    """

    hidden_size: int
    image_size: int
    native_grid: int
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    #: the mean whose colour Cambrian-1 padded this tower's images with, where it differs from ``image_mean``
    cambrian1_pad_mean: tuple[float, float, float] | None = None
    #: see :meth:`set_cambrian1_compat`
    cambrian1_compat: bool = False

    def __init__(self, token_len: int | None = None, freeze: bool = True, dtype: str = "float32") -> None:
        super().__init__()
        if token_len is not None and not is_square(token_len):
            raise ValueError(f"token_len={token_len} is not a perfect square (e.g. 576 = 24x24)")
        self._token_len = token_len
        self.frozen = freeze
        #: the configured ``freeze`` (what is saved); ``frozen`` is the current state, which stages change
        self.freeze = freeze
        self.dtype_name = dtype

    # ------------------------------------------------------------------ contract
    @abc.abstractmethod
    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Native-grid patch tokens ``[B, native_grid**2, hidden_size]`` (no CLS)."""

    def config_dict(self) -> dict[str, Any]:
        """The architecture-defining fields (feeds ``cache_key``); subclasses extend it."""
        return {
            "class": type(self).__name__,
            "image_size": self.image_size,
            "hidden_size": self.hidden_size,
            "token_len": self.token_len,
            # only when on, so the cache keys of existing feature caches stay as they were
            **({"cambrian1_compat": True} if self.cambrian1_compat else {}),
        }

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """Keywords that build a tiny, randomly initialised instance offline (registry-driven tests use it)."""
        raise TypeError(f"{cls.__name__} must define the classmethod tiny_config() for the registry tests")

    @classmethod
    def config_dims(cls, kwargs: dict[str, Any]) -> dict[str, int | None]:
        """``{"hidden_size", "token_len"}`` of the tower ``kwargs`` would build, as far as they are known without
        building it (``None`` = unknown). The composed model's config check uses them before any weights load;
        subclasses that can tell their width from the config override this."""
        return {"hidden_size": None, "token_len": kwargs.get("token_len")}

    def architecture_config(self) -> dict[str, Any]:
        """Keywords (without ``type``) that rebuild this exact architecture with no file or download, so a saved
        model restores its towers from its own folder alone. Weight-path keywords must be left out."""
        raise TypeError(
            f"{type(self).__name__} must define architecture_config() so saved models can restore it"
        )

    # ------------------------------------------------------------------ provided
    @property
    def token_len(self) -> int:
        """Number of output tokens (a perfect square)."""
        return self._token_len or self.native_grid**2

    @property
    def grid(self) -> int:
        """Side of the output token grid."""
        return math.isqrt(self.token_len)

    @property
    def fill_color(self) -> tuple[int, int, int]:
        """Padding colour of expand-to-square: the normalisation mean in 0..255, truncated as LLaVA / Cambrian-1
        and HF's ``LlavaImageProcessor`` do (CLIP mean -> (122, 116, 104)); in Cambrian-1 compatibility the
        mean Cambrian-1's processor used (``cambrian1_pad_mean``, e.g. the CLIP mean for SigLIP)."""
        mean = (
            self.cambrian1_pad_mean if self.cambrian1_compat and self.cambrian1_pad_mean else self.image_mean
        )
        return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]

    @property
    def resize_antialias(self) -> bool:
        """Whether shrinking token grids / stage maps is antialiased (off in Cambrian-1 compatibility)."""
        return not self.cambrian1_compat

    def set_cambrian1_compat(self, on: bool) -> None:
        """Preprocess and resize as Cambrian-1 did (for its released connectors): plain bilinear shrinking of
        token grids and stage maps, and Cambrian-1's expand-to-square pad colour. Part of ``config_dict``."""
        self.cambrian1_compat = bool(on)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> normalised ``[3, image_size, image_size]`` float tensor."""
        square = expand_to_square(image, self.fill_color).resize(
            (self.image_size, self.image_size), Image.Resampling.BICUBIC
        )
        x = torch.from_numpy(__import__("numpy").asarray(square, dtype="float32") / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (x - mean) / std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> ``[B, token_len, hidden_size]`` (computed in the tower's dtype)."""
        feats = self._call_tower(self.forward_features, pixels)
        return interpolate_tokens(feats, self.token_len, self.resize_antialias)

    def forward_staged(self, pixels: torch.Tensor) -> torch.Tensor | StagedTokens:
        """What ``forward`` returns, or, for a tower that concatenates stages of different grids, the same
        tokens as :class:`StagedTokens` (``.tokens()`` equals ``forward``) so that a connector can project
        the small stages before enlarging them. The composed model calls this for connectors that set
        ``accepts_staged``; the default is ``forward``."""
        return self(pixels)

    def _call_tower(self, fn: Callable[[torch.Tensor], Any], pixels: torch.Tensor) -> Any:
        """``fn(pixels)`` with the pixels in the tower's device and dtype, under ``no_grad`` when frozen."""
        param = next(self.parameters(), None)
        if param is not None:
            pixels = pixels.to(device=param.device, dtype=param.dtype)
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(grad):
            return fn(pixels)

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (or unfreeze) every parameter of the tower."""
        self.frozen = frozen
        for p in self.parameters():
            p.requires_grad_(not frozen)

    def cache_key(self) -> str:
        """Stable id of what this tower computes (architecture + weights digest) for the feature cache.

        The digest reads every weight's bytes (as fp32, so a tower cast to another dtype keeps its key): any
        change of any weight, however small (a fine-tuned tower), gives another key, so stale features are never
        served.
        """
        h = hashlib.blake2b(
            json.dumps(self.config_dict(), sort_keys=True, default=str).encode(), digest_size=16
        )
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().float().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]
