"""Hugging Face model class of a cambrian model exported with ``cambrian export hf --format remote``.

Load with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. It needs the ``cambrian``
package installed (``pip install cambrian``): the class wraps cambrian's own model, loaded from this folder
(which is also a saved cambrian model), so ``forward``, ``generate`` and ``chat`` are exactly cambrian's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from .configuration_cambrian import CambrianConfig

try:
    from cambrian_core.model.io import load_model
except ImportError as exc:  # pragma: no cover - depends on the user's environment
    raise ImportError(
        "this model's remote code runs the cambrian package; install it first: pip install cambrian"
    ) from exc

_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download")


def _local_folder(name_or_path: str | os.PathLike[str], kwargs: dict[str, Any]) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}))


class CambrianForCausalLM(PreTrainedModel):
    """A cambrian multimodal model (vision towers + connector + LLM) behind the transformers interface."""

    config_class = CambrianConfig
    base_model_prefix = "model"

    def __init__(self, config: CambrianConfig, model: torch.nn.Module | None = None) -> None:
        super().__init__(config)
        if model is None:
            raise ValueError(
                "build it with CambrianForCausalLM.from_pretrained(folder) (weights come from the folder)"
            )
        self.model = model

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *args: Any,
        config: CambrianConfig | None = None,
        dtype: Any = None,
        torch_dtype: Any = None,
        device_map: Any = None,
        **kwargs: Any,
    ) -> CambrianForCausalLM:
        folder = _local_folder(pretrained_model_name_or_path, kwargs)
        if config is None:
            config = CambrianConfig.from_pretrained(folder)
        dtype = dtype if dtype is not None else torch_dtype
        inner = load_model(folder, dtype=None if dtype in (None, "auto") else dtype)
        model = cls(config, inner)
        if isinstance(device_map, (str, torch.device)) and str(device_map) != "auto":
            model.to(device_map)
        return model.eval()

    @property
    def tokenizer(self) -> Any:
        """The LLM's tokenizer."""
        return self.model.tokenizer

    def prepare_images(self, images: Any) -> Any:
        """PIL images -> (one pixel tensor per tower, image sizes), as ``forward`` / ``generate`` take them."""
        return self.model.prepare_images(images)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """cambrian's forward: ``input_ids`` with one ``-200`` per image, ``pixel_values`` (one tensor per tower),
        ``image_sizes`` ...; returns a ``CausalLMOutputWithPast``."""
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """cambrian's KV-cache generation; returns the new token ids."""
        return self.model.generate(*args, **kwargs)

    def chat(self, *args: Any, **kwargs: Any) -> str:
        """Answer a prompt about images (cambrian's ``chat``)."""
        return self.model.chat(*args, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        *args: Any,
        push_to_hub: bool = False,
        safe_serialization: bool = True,
        max_shard_size: int | str = "5GB",
        **kwargs: Any,
    ) -> None:
        """Write this model again as a ``trust_remote_code`` folder: a new one, or replacing an empty folder or a
        saved model (``FileExistsError`` for a folder holding anything else). Only a local safetensors save is
        supported: other options of transformers' ``save_pretrained`` are refused, not ignored."""
        from cambrian_core.export.remote import export_remote_model
        from cambrian_core.model.io import check_replaceable

        refused = [f"positional arguments {args!r}"] if args else []
        if push_to_hub:
            refused.append("push_to_hub=True (save, then upload with huggingface_hub.upload_folder)")
        if not safe_serialization:
            refused.append("safe_serialization=False (the weights are always safetensors)")
        refused += [f"{k}=" for k in sorted(kwargs)]
        if refused:
            raise TypeError(
                f"CambrianForCausalLM.save_pretrained does not support {', '.join(refused)}; it takes "
                "save_directory and max_shard_size"
            )
        check_replaceable(save_directory)
        export_remote_model(self.model, save_directory, overwrite=True, max_shard_size=max_shard_size)
