"""Base of the towers backed by a transformers vision model (CLIP, SigLIP, DINOv2)."""

from __future__ import annotations

import abc
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cambrian_core.registry import suggest

from ._common import PluginEncoder

__all__ = ["HFVisionEncoder"]

#: config fields that describe a checkpoint's bookkeeping rather than the architecture
_META_KEYS = {
    "transformers_version",
    "architectures",
    "_name_or_path",
    "dtype",
    "torch_dtype",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "_attn_implementation_autoset",
    # backbone bookkeeping derived from the depth (DINOv2)
    "stage_names",
    "out_features",
    "out_indices",
}


class HFVisionEncoder(PluginEncoder):
    """A transformers vision model as a tower, built from a local HF folder or inline config keywords.

    Subclasses implement ``_classes(model_type)`` (model class, config class) and may override
    ``_prefix_tokens`` (leading non-patch tokens to drop) and ``_run`` (the model call).

    ``select_layer=None`` takes ``last_hidden_state`` (after the model's final norm where it has one);
    an integer takes ``hidden_states[select_layer]`` (0 = embeddings, -1 = last block, before the final norm).
    """

    #: config keys the model reads although some transformers releases do not declare them on the config class
    extra_config_keys: frozenset[str] = frozenset()

    def __init__(
        self,
        path: str | None,
        config: Mapping[str, Any] | None,
        token_len: int | None,
        select_layer: int | None,
        image_size: int | None,
        image_mean: tuple[float, float, float] | None,
        image_std: tuple[float, float, float] | None,
        freeze: bool,
        dtype: str,
    ) -> None:
        super().__init__(token_len=token_len, freeze=freeze, dtype=dtype)
        self.model, processor = self._build(path, config)
        cfg = self.model.config
        self.hidden_size = int(cfg.hidden_size)
        self.trained_image_size = int(cfg.image_size)
        self.image_size = int(image_size or cfg.image_size)
        patch = int(cfg.patch_size)
        if self.image_size % patch:
            raise ValueError(
                f"{self.family}: image_size={self.image_size} is not a multiple of the patch size {patch}"
            )
        self.native_grid = self.image_size // patch
        depth = int(cfg.num_hidden_layers)
        if select_layer is not None and not -(depth + 1) <= select_layer <= depth:
            raise ValueError(
                f"{self.family}: select_layer={select_layer} is out of range for {depth} layers "
                f"(hidden_states has {depth + 1} entries: -{depth + 1}..{depth}); None = last_hidden_state"
            )
        self.select_layer = select_layer
        self.image_mean = tuple(image_mean or processor.get("image_mean") or type(self).image_mean)
        self.image_std = tuple(image_std or processor.get("image_std") or type(self).image_std)
        self._finish(freeze, dtype)

    # ------------------------------------------------------------------ family hooks
    @abc.abstractmethod
    def _classes(self, model_type: str | None) -> tuple[type[nn.Module], type[Any]]:
        """(model class, config class) of the family for an HF ``model_type``."""

    def _prefix_tokens(self) -> int:
        return 0

    def _run(self, pixels: torch.Tensor, hidden: bool) -> Any:
        interp = self.image_size != self.trained_image_size
        return self.model(pixel_values=pixels, output_hidden_states=hidden, interpolate_pos_encoding=interp)

    @classmethod
    def check_config(cls, kwargs: Mapping[str, Any]) -> list[str]:
        problems = super().check_config(kwargs)
        if (kwargs.get("path") is None) == (kwargs.get("config") is None):
            problems.append(
                "pass exactly one of path= (a local Hugging Face folder) or config= (HF config keywords)"
            )
        return problems

    @classmethod
    def _meta_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A ``path`` becomes the folder's inline config, so the meta build reads no weights."""
        path = kwargs.get("path")
        if path is None:
            return kwargs
        cfg = json.loads((Path(path) / "config.json").read_text())
        cfg = cfg.get("vision_config", cfg)
        cfg = {k: v for k, v in cfg.items() if k not in _META_KEYS and k != "model_type"}
        return {**{k: v for k, v in kwargs.items() if k != "path"}, "config": cfg}

    # ------------------------------------------------------------------ building
    def _build(self, path: str | None, config: Mapping[str, Any] | None) -> tuple[nn.Module, dict[str, Any]]:
        if (path is None) == (config is None):
            raise ValueError(
                f"{self.family}: pass exactly one of path= (a local Hugging Face folder) or config= (inline HF "
                f"config keywords for a randomly initialised tower)"
            )
        if path is not None:
            return self._from_folder(Path(path))
        config = dict(config or {})
        model_class, config_class = self._classes(config.pop("model_type", None))
        known = set(config_class().to_dict()) | set(inspect.signature(config_class.__init__).parameters)
        known |= self.extra_config_keys
        for key in config:
            if key not in known:
                hint = suggest(key, sorted(known))
                did = f" (did you mean `{hint}`?)" if hint else ""
                raise ValueError(f"{self.family}: unknown {config_class.__name__} key `{key}`{did}")
        try:
            cfg = config_class(**config)
        except Exception as exc:  # transformers validates architectures with several exception types
            raise ValueError(f"{self.family}: invalid {config_class.__name__}: {exc}") from exc
        return model_class(cfg), {}

    def _from_folder(self, folder: Path) -> tuple[nn.Module, dict[str, Any]]:
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{self.family}: path={str(folder)!r} is not a local Hugging Face model folder (no config.json). "
                f"Towers never download: fetch the model yourself (`hf download <repo> --local-dir DIR`) and pass "
                f"path=DIR, or pass config=dict(...) for a randomly initialised tower"
            )
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        model_class, _ = self._classes(model_type)
        model, info = model_class.from_pretrained(
            str(folder), local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
        missing = list(info.get("missing_keys") or [])
        if missing:
            raise ValueError(
                f"{self.family}: {str(folder)!r} lacks {len(missing)} weights of {model_class.__name__}, e.g. "
                f"{sorted(missing)[:5]}; is it a {model_class.__name__} folder?"
            )
        proc_file = folder / "preprocessor_config.json"
        processor = json.loads(proc_file.read_text()) if proc_file.is_file() else {}
        return model, processor

    # ------------------------------------------------------------------ contract
    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.select_layer is not None
        out = self._run(pixels, hidden)
        feats = out.hidden_states[self.select_layer] if hidden else out.last_hidden_state
        return feats[:, self._prefix_tokens() :]

    def hf_config(self) -> dict[str, Any]:
        """The model's HF config as plain keywords (bookkeeping fields removed), enough to rebuild it."""
        cfg = self.model.config.to_dict()
        return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in _META_KEYS}))

    def architecture_config(self) -> dict[str, Any]:
        return {
            "config": self.hf_config(),
            "token_len": self._token_len,
            "select_layer": self.select_layer,
            "image_size": self.image_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "freeze": self.freeze,
            "dtype": self.dtype_name,
        }

    def config_dict(self) -> dict[str, Any]:
        return {**super().config_dict(), **self.architecture_config(), "freeze": None}
