"""SigLIP towers.

``siglip``: the open_clip ``ViT-SO400M-14-SigLIP-384`` image trunk, which is the timm ViT
``vit_so400m_patch14_siglip_384`` (384 px, 27x27 patches, width 1152, no CLS). Like Cambrian-1 it takes the
trunk's ``forward_features``: the last block after the final LayerNorm. Weights come from a local open_clip
checkpoint (``visual.trunk.*`` keys) or a timm one.

``siglip_hf``: HF ``SiglipVisionModel`` from a local HF folder (a full ``SiglipModel`` folder works too) or
inline config keywords; ``last_hidden_state`` (after ``post_layernorm``) by default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from cambrian_core.model.encoder import CLIP_MEAN, HALF_MEAN, HALF_STD

from ._hf import HFVisionEncoder
from .timm_tower import TimmEncoder

__all__ = ["SiglipEncoder", "SiglipHFEncoder"]


class SiglipEncoder(TimmEncoder):
    """SigLIP image trunk through timm (what open_clip wraps).

    Args:
        model_name: timm ViT name (default the SO400M/14 at 384 px).
        model_kwargs: extra ``timm.create_model`` keywords (tiny test towers set ``embed_dim``, ``depth`` ...).
        checkpoint: local open_clip or timm weights file (``.safetensors`` or torch, ``weights_only``).
        select_layer: ``None`` = last block after the final norm (Cambrian-1); an int takes that block's output
            without the norm (-2 = penultimate block).
        image_size: input resolution (default: the model's); other values resample the position embeddings.
        image_mean, image_std: normalisation (default SigLIP's 0.5 / 0.5).
        token_len: square output token count (``None``: the native 27x27 grid).
        freeze: exclude from training and run without gradients.
        dtype: ``float32`` / ``bfloat16`` / ``float16``.
    """

    family = "siglip"
    image_mean = HALF_MEAN
    image_std = HALF_STD
    cambrian1_pad_mean = CLIP_MEAN  # Cambrian-1's SigLIP wrapper padded with the CLIP mean (spec B.2)

    def __init__(
        self,
        model_name: str = "vit_so400m_patch14_siglip_384",
        model_kwargs: Mapping[str, Any] | None = None,
        checkpoint: str | None = None,
        select_layer: int | None = None,
        image_size: int | None = None,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
        token_len: int | None = None,
        freeze: bool = True,
        dtype: str = "float32",
    ) -> None:
        super().__init__(
            model_name,
            model_kwargs=model_kwargs,
            checkpoint=checkpoint,
            stages=(-1 if select_layer is None else select_layer,),
            final_norm=select_layer is None,
            image_size=image_size,
            image_mean=image_mean or HALF_MEAN,
            image_std=image_std or HALF_STD,
            token_len=token_len,
            freeze=freeze,
            dtype=dtype,
        )
        self.select_layer = select_layer

    def architecture_config(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_kwargs": dict(self.model_kwargs),
            "select_layer": self.select_layer,
            **self._common_config(),
        }

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {
            "model_kwargs": {"img_size": 56, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
            "token_len": 9,
        }


class SiglipHFEncoder(HFVisionEncoder):
    """HF SigLIP vision tower.

    Args:
        path: local HF folder of a ``SiglipVisionModel`` or a full ``SiglipModel``.
        config: inline ``SiglipVisionConfig`` keywords (random initialisation), instead of ``path``.
        token_len: square output token count (``None``: native grid).
        select_layer: ``None`` (default) = ``last_hidden_state`` after ``post_layernorm``; an int indexes
            ``hidden_states`` (before the norm).
        image_size: input resolution; other values than the trained one interpolate the position embeddings.
        image_mean, image_std: normalisation override (default: the folder's processor, else 0.5 / 0.5).
        freeze: exclude from training and run without gradients.
        dtype: ``float32`` / ``bfloat16`` / ``float16``.

    The attention-pooling head is removed (tokens never use it), and ``vision_use_head=False`` is recorded
    in the architecture config.
    """

    family = "siglip_hf"
    extra_config_keys = frozenset(
        {"vision_use_head"}
    )  # read with hasattr() before transformers 5.2x declared it
    image_mean = HALF_MEAN
    image_std = HALF_STD
    cambrian1_pad_mean = CLIP_MEAN  # Cambrian-1's SigLIP wrapper padded with the CLIP mean (spec B.2)

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
        super().__init__(
            path, config, token_len, select_layer, image_size, image_mean, image_std, freeze, dtype
        )
        if getattr(self.model, "use_head", False):
            del self.model.head
            self.model.use_head = False
            self.model.config.vision_use_head = False

    def _classes(self, model_type: str | None) -> tuple[type[nn.Module], type[Any]]:
        from transformers import SiglipVisionConfig, SiglipVisionModel

        return SiglipVisionModel, SiglipVisionConfig

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
            "token_len": 4,
        }


def register(registries: Any) -> None:
    registries.encoders.register_module(name="siglip", module=SiglipEncoder)
    registries.encoders.register_module(name="siglip_hf", module=SiglipHFEncoder)
