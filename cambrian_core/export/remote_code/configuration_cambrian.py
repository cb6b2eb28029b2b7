"""Hugging Face config of a cambrian model exported with ``cambrian export hf --format remote``.

``cambrian`` holds the full cambrian model config (towers, connector, LLM keywords); the folder is at the same
time a saved cambrian model (``cambrian_config.json`` + weights), which the model class loads.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class CambrianConfig(PretrainedConfig):
    """Config of ``CambrianForCausalLM`` (see ``modeling_cambrian.py``)."""

    model_type = "cambrian"

    def __init__(self, cambrian: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.cambrian = dict(cambrian or {})
        super().__init__(**kwargs)
