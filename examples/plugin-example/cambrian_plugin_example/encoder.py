"""A small convolutional patch encoder: conv stem + strided patchify + GELU MLP."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cambrian_core.model.encoder import IMAGENET_MEAN, IMAGENET_STD, VisionEncoder


class PatchConvEncoder(VisionEncoder):
    """Patchify with a strided convolution, then a per-token MLP.

    Args:
        image_size: input resolution.
        patch_size: stride of the patchifying convolution (must divide ``image_size``).
        hidden_size: output channels.
        weights: optional local ``.safetensors`` file with this module's state dict.
    """

    image_mean = IMAGENET_MEAN
    image_std = IMAGENET_STD

    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 8,
        hidden_size: int = 48,
        token_len: int | None = None,
        freeze: bool = True,
        dtype: str = "float32",
        weights: str | None = None,
    ) -> None:
        super().__init__(token_len=token_len, freeze=freeze, dtype=dtype)
        if image_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide image_size={image_size}")
        self.image_size, self.patch_size, self.hidden_size = image_size, patch_size, hidden_size
        self.native_grid = image_size // patch_size
        self.patchify = nn.Conv2d(3, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.mlp = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, hidden_size), nn.GELU())
        if weights is not None:
            from safetensors.torch import load_file

            self.load_state_dict(load_file(weights))
        self.to(getattr(torch, dtype))
        self.set_frozen(freeze)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"image_size": 32, "patch_size": 8, "hidden_size": 16}

    def architecture_config(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "patch_size": self.patch_size, "hidden_size": self.hidden_size}

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patchify(pixels).flatten(2).transpose(1, 2)
        return x + self.mlp(x)
