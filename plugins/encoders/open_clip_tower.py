"""Generic open_clip tower: the image half of any open_clip model (BiomedCLIP-style timm trunks included).

Only the vision tower is built (``open_clip.model._build_vision_tower``), so models whose text tower needs a
Hugging Face download (BiomedCLIP's PubMedBERT) still build offline. Tokens come from the trunk: for a native
open_clip ViT the patch tokens after ``ln_post``; for a timm trunk its ``forward_features`` tokens (prefix
tokens dropped). The pooling / projection head is pruned.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cambrian_core.model.encoder import CLIP_MEAN, CLIP_STD
from cambrian_core.registry import suggest

from ._common import PluginEncoder, load_module_weights, read_weights, resize_map

__all__ = ["OpenClipEncoder"]

#: weight files of a Hugging Face open_clip folder, in order of preference
FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as exc:  # optional dependency
        raise ImportError(
            "the `open_clip` encoder needs open_clip: `pip install open_clip_torch` (a cambrian dependency)"
        ) from exc
    return open_clip


class OpenClipEncoder(PluginEncoder):
    """The vision tower of an open_clip model.

    Args:
        model_name: an ``open_clip.list_models()`` name (its config ships with open_clip), or
        config: an open_clip model config dict (``embed_dim``, ``vision_cfg``, optional ``quick_gelu`` and
            ``preprocess_cfg``; ``text_cfg`` is ignored), or
        path: a local open_clip folder as on the Hugging Face hub (``open_clip_config.json`` plus
            ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), e.g. a downloaded BiomedCLIP.
        checkpoint: local weights file (full open_clip ``visual.*`` keys or the visual tower's own keys).
        select_layer: ``None`` = final tokens (after the final norm); an int takes that block / stage output
            without the norm.
        image_mean, image_std: normalisation (default: the config's ``preprocess_cfg``, else CLIP's).
        token_len: square output token count (``None``: native grid).
        freeze: exclude from training and run without gradients.
        dtype: ``float32`` / ``bfloat16`` / ``float16``.
    """

    family = "open_clip"
    image_mean = CLIP_MEAN
    image_std = CLIP_STD

    def __init__(
        self,
        model_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        path: str | None = None,
        checkpoint: str | None = None,
        select_layer: int | None = None,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
        token_len: int | None = None,
        freeze: bool = True,
        dtype: str = "float32",
    ) -> None:
        super().__init__(token_len=token_len, freeze=freeze, dtype=dtype)
        cfg, checkpoint = self._resolve(model_name, config, path, checkpoint)
        self.model_cfg = {
            k: cfg[k] for k in ("embed_dim", "vision_cfg", "quick_gelu", "preprocess_cfg") if k in cfg
        }
        visual = _open_clip().model._build_vision_tower(
            cfg["embed_dim"], dict(cfg["vision_cfg"]), quick_gelu=bool(cfg.get("quick_gelu", False))
        )
        self.select_layer = select_layer
        self.image_size = int(_first(cfg["vision_cfg"].get("image_size", 224)))
        if hasattr(
            visual, "trunk"
        ):  # TimmModel: a timm trunk inside open_clip (BiomedCLIP, ConvNeXt, SigLIP)
            self.visual, prefixes, self._timm_trunk = visual.trunk, ("visual.trunk.", "trunk.", ""), True
            info = list(self.visual.feature_info)
            self._index = self._absolute(select_layer, len(info))
            self.hidden_size = int(info[self._index]["num_chs"])
            self.native_grid = self.image_size // int(info[self._index]["reduction"])
        elif hasattr(visual, "transformer") and hasattr(visual, "forward_intermediates"):
            self.visual, prefixes, self._timm_trunk = visual, ("visual.", ""), False
            self._index = self._absolute(select_layer, len(visual.transformer.resblocks))
            self.hidden_size = int(visual.transformer.width)
            self.native_grid = self.image_size // int(_first(visual.patch_size))
        else:
            raise ValueError(
                f"open_clip: vision tower {type(visual).__name__} has no patch-token output; supported are "
                f"open_clip ViTs and timm trunks"
            )
        self.visual.prune_intermediate_layers(
            indices=[self._index], prune_norm=select_layer is not None, prune_head=True
        )
        if checkpoint is not None:
            load_module_weights(
                self.visual, read_weights(checkpoint), prefixes, f"open_clip checkpoint {checkpoint}"
            )
        pre = cfg.get("preprocess_cfg") or {}
        self.image_mean = tuple(image_mean or pre.get("mean") or CLIP_MEAN)
        self.image_std = tuple(image_std or pre.get("std") or CLIP_STD)
        self._finish(freeze, dtype)

    @classmethod
    def check_config(cls, kwargs: Mapping[str, Any]) -> list[str]:
        problems = super().check_config(kwargs)
        if sum(kwargs.get(k) is not None for k in ("model_name", "config", "path")) != 1:
            problems.append("pass exactly one of model_name=, config= or path=")
        return problems

    # ------------------------------------------------------------------ building
    @staticmethod
    def _resolve(
        model_name: str | None, config: Mapping[str, Any] | None, path: str | None, checkpoint: str | None
    ) -> tuple[dict[str, Any], str | None]:
        if sum(x is not None for x in (model_name, config, path)) != 1:
            raise ValueError("open_clip: pass exactly one of model_name=, config= or path=")
        if config is not None:
            cfg = json.loads(json.dumps(dict(config)))
        elif path is not None:
            folder = Path(path)
            cfg_file = folder / "open_clip_config.json"
            if not cfg_file.is_file():
                raise FileNotFoundError(
                    f"open_clip: path={path!r} has no open_clip_config.json; download the model folder yourself "
                    f"(`hf download <repo> --local-dir DIR`) and pass path=DIR"
                )
            raw = json.loads(cfg_file.read_text())
            cfg = {**raw["model_cfg"], "preprocess_cfg": raw.get("preprocess_cfg", {})}
            if checkpoint is None:
                found = [folder / f for f in FOLDER_WEIGHTS if (folder / f).is_file()]
                if not found:
                    raise FileNotFoundError(f"open_clip: {path!r} holds none of {', '.join(FOLDER_WEIGHTS)}")
                checkpoint = str(found[0])
        else:
            open_clip = _open_clip()
            if str(model_name).startswith(("hf-hub:", "local-dir:")):
                raise ValueError(
                    f"open_clip: {model_name!r} refers to a hub or folder; download it and pass path=DIR instead"
                )
            cfg = open_clip.get_model_config(model_name)
            if cfg is None:
                hint = suggest(str(model_name), open_clip.list_models())
                did = f" Did you mean `{hint}`?" if hint else ""
                raise ValueError(
                    f"open_clip: unknown model `{model_name}`.{did} See open_clip.list_models()."
                )
            cfg = json.loads(json.dumps(cfg))
        if "vision_cfg" not in cfg or "embed_dim" not in cfg:
            raise ValueError(
                f"open_clip: a model config needs `embed_dim` and `vision_cfg`; got keys {sorted(cfg)}"
            )
        return cfg, checkpoint

    def _absolute(self, select_layer: int | None, n: int) -> int:
        index = -1 if select_layer is None else select_layer
        if not -n <= index < n:
            raise ValueError(
                f"open_clip: select_layer={select_layer} is out of range for {n} blocks / stages"
            )
        return index % n

    # ------------------------------------------------------------------ contract
    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        norm = self.select_layer is None
        if self._timm_trunk:
            fmap = self.visual.forward_intermediates(
                pixels, indices=[self._index], norm=norm, intermediates_only=True
            )[0]
        else:
            out = self.visual.forward_intermediates(
                pixels, indices=[self._index], normalize_intermediates=norm, intermediates_only=True
            )
            fmap = out["image_intermediates"][0]
        return resize_map(fmap, self.native_grid, self.resize_antialias)

    def architecture_config(self) -> dict[str, Any]:
        return {
            "config": json.loads(json.dumps(self.model_cfg)),
            "select_layer": self.select_layer,
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
        return {
            "config": {
                "embed_dim": 16,
                "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
            },
            "token_len": 9,
        }


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


def register(registries: Any) -> None:
    registries.encoders.register_module(name="open_clip", module=OpenClipEncoder)
