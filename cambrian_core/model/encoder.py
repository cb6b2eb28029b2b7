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
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

__all__ = ["VisionEncoder", "expand_to_square", "interpolate_tokens", "is_square"]

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


def interpolate_tokens(x: torch.Tensor, token_len: int) -> torch.Tensor:
    """Resize ``[B, N, C]`` square-grid tokens to ``token_len`` tokens (bilinear, fp32, antialiased when shrinking)."""
    b, n, c = x.shape
    if n == token_len:
        return x
    src, dst = math.isqrt(n), math.isqrt(token_len)
    if src * src != n or dst * dst != token_len:
        raise ValueError(f"cannot interpolate {n} tokens to {token_len}: both must be perfect squares")
    grid = x.transpose(1, 2).reshape(b, c, src, src).float()
    out = F.interpolate(grid, size=(dst, dst), mode="bilinear", align_corners=False, antialias=dst < src)
    return out.reshape(b, c, token_len).transpose(1, 2).to(x.dtype)


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

    def __init__(self, token_len: int | None = None, freeze: bool = True, dtype: str = "float32") -> None:
        super().__init__()
        if token_len is not None and not is_square(token_len):
            raise ValueError(f"token_len={token_len} is not a perfect square (e.g. 576 = 24x24)")
        self._token_len = token_len
        self.frozen = freeze
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
        and HF's ``LlavaImageProcessor`` do (CLIP mean -> (122, 116, 104))."""
        return tuple(int(m * 255) for m in self.image_mean)  # type: ignore[return-value]

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
        param = next(self.parameters(), None)
        if param is not None:
            pixels = pixels.to(device=param.device, dtype=param.dtype)
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(grad):
            feats = self.forward_features(pixels)
        return interpolate_tokens(feats, self.token_len)

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (or unfreeze) every parameter of the tower."""
        self.frozen = frozen
        for p in self.parameters():
            p.requires_grad_(not frozen)

    def cache_key(self) -> str:
        """Stable id of what this tower computes (architecture + weights digest) for the feature cache."""
        h = hashlib.sha256(json.dumps(self.config_dict(), sort_keys=True, default=str).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().sum().item().hex().encode())
            h.update(str(tuple(t.shape)).encode())
        return h.hexdigest()[:16]
