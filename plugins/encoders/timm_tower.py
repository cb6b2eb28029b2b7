"""Generic timm tower: any ``timm.create_model`` name (no download), features from ``forward_intermediates``.

The chosen stages are each resized once, straight to the requested square grid (bilinear in fp32, antialiased
when shrinking), and concatenated on channels, so a multi-stage CNN becomes one token grid whose width is the
sum of the stage widths. Layers after the last chosen stage and the classifier head are pruned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cambrian_core.model.encoder import StagedTokens
from cambrian_core.registry import suggest

from ._common import PluginEncoder, load_module_weights, read_weights

__all__ = ["TimmEncoder"]

#: key prefixes a trunk may carry in a checkpoint: timm, open_clip (``visual.trunk.``), wrapped trunks
CHECKPOINT_PREFIXES = ("", "visual.trunk.", "trunk.", "model.", "visual.")


def create_timm_model(model_name: str, model_kwargs: Mapping[str, Any], family: str) -> torch.nn.Module:
    """``timm.create_model(model_name, pretrained=False, **model_kwargs)`` with clear errors."""
    import timm

    if not timm.is_model(model_name):
        hint = suggest(model_name, timm.list_models())
        did = f" Did you mean `{hint}`?" if hint else ""
        raise ValueError(f"{family}: timm has no model `{model_name}`.{did} See `timm.list_models()`.")
    try:
        return timm.create_model(model_name, pretrained=False, **model_kwargs)
    except TypeError as exc:
        raise ValueError(
            f"{family}: timm model `{model_name}` rejected model_kwargs {model_kwargs}: {exc}"
        ) from exc


class TimmEncoder(PluginEncoder):
    """A timm model as a tower.

    Args:
        model_name: a ``timm.list_models()`` name; built with ``pretrained=False`` (nothing is downloaded).
        model_kwargs: extra ``timm.create_model`` keywords (e.g. ``depth``, ``embed_dim``, ``img_size``).
        checkpoint: local weights file (timm or open_clip ``visual.trunk.*`` keys; ``.safetensors`` or a
            torch file read with ``weights_only=True``). Every tensor the tower keeps must be present.
        stages: ``forward_intermediates`` indices (feature levels of a CNN, blocks of a ViT; negative counts
            from the end); ``None`` = every level.
        final_norm: apply the model's final norm to the taken features (timm's ``norm=True``).
        image_size: input resolution (default: the model's); ViTs resample their position embeddings.
        image_mean, image_std: normalisation (default: the model's ``pretrained_cfg``).
        token_len: square output token count (``None``: the grid of the coarsest chosen stage).
        freeze: exclude from training and run without gradients.
        dtype: ``float32`` / ``bfloat16`` / ``float16``.
    """

    family = "timm"

    def __init__(
        self,
        model_name: str,
        model_kwargs: Mapping[str, Any] | None = None,
        checkpoint: str | None = None,
        stages: Sequence[int] | None = (-1,),
        final_norm: bool = True,
        image_size: int | None = None,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
        token_len: int | None = None,
        freeze: bool = True,
        dtype: str = "float32",
    ) -> None:
        super().__init__(token_len=token_len, freeze=freeze, dtype=dtype)
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs or {})
        self.final_norm = final_norm
        model = create_timm_model(model_name, self.model_kwargs, self.family)
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "prune_intermediate_layers"):
            raise ValueError(
                f"{self.family}: timm model `{model_name}` has no forward_intermediates(); pick one that has "
                f"(most timm>=1.0 models do)"
            )
        info = list(model.feature_info)
        self.stages = self._absolute_stages(stages, len(info))
        self.hidden_size = sum(int(info[i]["num_chs"]) for i in self.stages)
        reduction = max(int(info[i]["reduction"]) for i in self.stages)
        built = getattr(getattr(model, "patch_embed", None), "img_size", None)
        built_size = (
            int(built[0]) if built is not None else int(model.pretrained_cfg.get("input_size", (3, 224))[-1])
        )
        self.image_size = int(image_size or built_size)
        self.native_grid = max(self.image_size // reduction, 1)
        cfg = model.pretrained_cfg
        self.image_mean = tuple(image_mean or cfg.get("mean") or type(self).image_mean)
        self.image_std = tuple(image_std or cfg.get("std") or type(self).image_std)
        model.prune_intermediate_layers(indices=list(self.stages), prune_norm=not final_norm, prune_head=True)
        if checkpoint is not None:
            state = read_weights(checkpoint)
            load_module_weights(
                model, state, CHECKPOINT_PREFIXES, source=f"{self.family} checkpoint {checkpoint}"
            )
        if self.image_size != built_size and hasattr(model, "set_input_size"):
            model.set_input_size(img_size=(self.image_size, self.image_size))
        self.trunk = model
        self._finish(freeze, dtype)

    def _absolute_stages(self, stages: Sequence[int] | int | None, n: int) -> tuple[int, ...]:
        if stages is None:
            return tuple(range(n))
        stages = [stages] if isinstance(stages, int) else list(stages)
        if not stages:
            raise ValueError(f"{self.family}: stages is empty; give at least one feature index (0..{n - 1})")
        out = []
        for s in stages:
            if not -n <= s < n:
                raise ValueError(
                    f"{self.family}: stage index {s} is out of range for `{self.model_name}`, which has {n} "
                    f"feature levels (0..{n - 1}, or -{n}..-1)"
                )
            out.append(s % n)
        if len(set(out)) != len(out):
            raise ValueError(f"{self.family}: stages {list(stages)} name the same level twice")
        return tuple(sorted(out))

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Every chosen stage resized to the output grid and concatenated: ``[B, token_len, hidden_size]``."""
        return self._stages(pixels).tokens()

    def forward_staged(self, pixels: torch.Tensor) -> StagedTokens:
        """The chosen stages as :class:`StagedTokens`: those smaller than the output grid not yet enlarged."""
        return self._call_tower(self._stages, pixels)

    def _stages(self, pixels: torch.Tensor) -> StagedTokens:
        maps = self.trunk.forward_intermediates(
            pixels, indices=list(self.stages), norm=self.final_norm, intermediates_only=True
        )
        return StagedTokens.from_maps(maps, self.grid, self.resize_antialias)

    def architecture_config(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_kwargs": dict(self.model_kwargs),
            "stages": list(self.stages),
            "final_norm": self.final_norm,
            **self._common_config(),
        }

    def _common_config(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "token_len": self._token_len,
            "freeze": self.freeze,
            "dtype": self.dtype_name,
        }

    def config_dict(self) -> dict[str, Any]:
        return {**super().config_dict(), **self.architecture_config(), "freeze": None}

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"model_name": "test_resnet", "stages": [-2, -1], "image_size": 64, "token_len": 16}


def register(registries: Any) -> None:
    registries.encoders.register_module(name="timm", module=TimmEncoder)
