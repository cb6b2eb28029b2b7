"""CLIP tower: HF ``CLIPVisionModel``, ``hidden_states[-2]`` (penultimate block, before the final norm), CLS
dropped, as LLaVA and Cambrian-1 use ``openai/clip-vit-large-patch14-336``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from cambrian_core.model.encoder import CLIP_MEAN, CLIP_STD

from ._hf import HFVisionEncoder

__all__ = ["ClipEncoder"]


class ClipEncoder(HFVisionEncoder):
    """HF CLIP vision tower.

    Args:
        path: local HF folder of a ``CLIPVisionModel`` or a full ``CLIPModel`` (its vision half is used); the
            folder's ``preprocessor_config.json`` supplies the normalisation when present.
        config: inline ``CLIPVisionConfig`` keywords (random initialisation), instead of ``path``.
        token_len: square output token count (``None``: native grid).
        select_layer: index into ``hidden_states`` (default -2); ``None`` = ``last_hidden_state``.
        image_size: input resolution; a value other than the trained one interpolates the position embeddings.
        image_mean, image_std: normalisation override (default: the folder's processor, else CLIP's).
        freeze: exclude from training and run without gradients.
        dtype: ``float32`` / ``bfloat16`` / ``float16``.
    """

    family = "clip"
    image_mean = CLIP_MEAN
    image_std = CLIP_STD

    def __init__(
        self,
        path: str | None = None,
        config: Mapping[str, Any] | None = None,
        token_len: int | None = None,
        select_layer: int | None = -2,
        image_size: int | None = None,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
        freeze: bool = True,
        dtype: str = "float32",
    ) -> None:
        super().__init__(
            path, config, token_len, select_layer, image_size, image_mean, image_std, freeze, dtype
        )

    def _classes(self, model_type: str | None) -> tuple[type[nn.Module], type[Any]]:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        return CLIPVisionModel, CLIPVisionConfig

    def _prefix_tokens(self) -> int:
        return 1

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {
            "config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            "token_len": 9,
        }


def register(registries: Any) -> None:
    registries.encoders.register_module(name="clip", module=ClipEncoder)
