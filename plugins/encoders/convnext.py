"""Multi-stage ConvNeXt tower (Cambrian-1's ``clip-convnext-XXL-multi-stage``).

The open_clip ConvNeXt image trunk is timm's ConvNeXt (``convnext_xxlarge`` for
``CLIP-convnext_xxlarge-laion2B``, 1024 px in Cambrian-1). All four stage maps (strides 4/8/16/32, widths
384/768/1536/3072) are resized once, directly to the requested square grid, and concatenated on channels
(5760 for XXL); ``single_stage=True`` keeps only the last stage. Unlike Cambrian-1, shrinking is antialiased
(``tower_cambrian1_compat=True`` on the model shrinks by plain bilinear, as Cambrian-1 did).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cambrian_core.model.encoder import CLIP_MEAN, CLIP_STD

from .timm_tower import TimmEncoder

__all__ = ["ConvNextEncoder"]


class ConvNextEncoder(TimmEncoder):
    """ConvNeXt trunk, every stage resized to the token grid and concatenated.

    Args:
        model_name: timm ConvNeXt name (default ``convnext_xxlarge``; ``convnext_large_d_320`` for ``-L``).
        model_kwargs: extra ``timm.create_model`` keywords (tiny test towers set ``depths`` and ``dims``).
        checkpoint: local open_clip (``visual.trunk.*``) or timm weights file.
        single_stage: keep only the last stage (width 3072 for XXL) instead of all four.
        image_size: input resolution (default 1024, as Cambrian-1).
        image_mean, image_std: normalisation (default CLIP's, as open_clip).
        token_len: square output token count (Cambrian-1 uses 9216 = 96x96; ``None``: the stride-32 grid).
        freeze: exclude from training and run without gradients.
        dtype: ``float32`` / ``bfloat16`` / ``float16``.
    """

    family = "convnext"
    image_mean = CLIP_MEAN
    image_std = CLIP_STD

    def __init__(
        self,
        model_name: str = "convnext_xxlarge",
        model_kwargs: Mapping[str, Any] | None = None,
        checkpoint: str | None = None,
        single_stage: bool = False,
        image_size: int = 1024,
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
            stages=(-1,) if single_stage else None,
            final_norm=False,
            image_size=image_size,
            image_mean=image_mean or CLIP_MEAN,
            image_std=image_std or CLIP_STD,
            token_len=token_len,
            freeze=freeze,
            dtype=dtype,
        )
        self.single_stage = single_stage

    def architecture_config(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_kwargs": dict(self.model_kwargs),
            "single_stage": self.single_stage,
            **self._common_config(),
        }

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {
            "model_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]},
            "image_size": 64,
            "token_len": 16,
        }


def register(registries: Any) -> None:
    registries.encoders.register_module(name="convnext", module=ConvNextEncoder)
