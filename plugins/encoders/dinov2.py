"""DINOv2 tower: HF ``Dinov2Model`` (or ``Dinov2WithRegistersModel``), ``last_hidden_state`` after the final
norm, CLS and register tokens dropped; ``image_size`` overrides the resolution (Cambrian-1 runs 378 px, 27x27
patches) and the position embeddings are interpolated."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cambrian_core.model.encoder import IMAGENET_MEAN, IMAGENET_STD

from ._hf import HFVisionEncoder

__all__ = ["Dinov2Encoder"]


class Dinov2Encoder(HFVisionEncoder):
    """HF DINOv2 vision tower.

    Args:
        path: local HF folder of a ``Dinov2Model`` / ``Dinov2WithRegistersModel``.
        config: inline ``Dinov2Config`` keywords (``model_type="dinov2_with_registers"`` or a
            ``num_register_tokens`` key selects the register variant), instead of ``path``.
        token_len: square output token count (``None``: native grid).
        select_layer: ``None`` (default) = ``last_hidden_state``; an int indexes ``hidden_states``.
        image_size: input resolution, e.g. 378 (position embeddings are interpolated).
        image_mean, image_std: normalisation override (default: the folder's processor, else ImageNet's).
        freeze: exclude from training and run without gradients.
        dtype: ``float32`` / ``bfloat16`` / ``float16``.
    """

    family = "dinov2"
    image_mean = IMAGENET_MEAN
    image_std = IMAGENET_STD

    def __init__(
        self,
        path: str | None = None,
        config: Mapping[str, Any] | None = None,
        token_len: int | None = None,
        select_layer: int | None = None,
        image_size: int | None = None,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
        freeze: bool = True,
        dtype: str = "float32",
    ) -> None:
        if config is not None and "num_register_tokens" in config:
            config = {"model_type": "dinov2_with_registers", **config}
        super().__init__(
            path, config, token_len, select_layer, image_size, image_mean, image_std, freeze, dtype
        )

    def _classes(self, model_type: str | None) -> tuple[type[nn.Module], type[Any]]:
        import transformers

        if model_type == "dinov2_with_registers":
            return transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig
        return transformers.Dinov2Model, transformers.Dinov2Config

    def _prefix_tokens(self) -> int:
        return 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)

    def _run(self, pixels: torch.Tensor, hidden: bool) -> Any:
        return self.model(pixel_values=pixels, output_hidden_states=hidden)  # always interpolates positions

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {
            "config": {
                "hidden_size": 32,
                "mlp_ratio": 2,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 64,
                "patch_size": 8,
            },
            "image_size": 48,
            "token_len": 16,
        }


def register(registries: Any) -> None:
    registries.encoders.register_module(name="dinov2", module=Dinov2Encoder)
