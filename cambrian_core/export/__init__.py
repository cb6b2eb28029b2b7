"""Checkpoint interop: Cambrian-1 import, TPU shard consolidation, Hugging Face export, LoRA merge, dtype
conversion, sharded safetensors and model cards (``cambrian export ...``)."""

from __future__ import annotations

from cambrian_core.export.cambrian1 import import_cambrian1
from cambrian_core.export.card import write_model_card
from cambrian_core.export.dtype import convert_dtype
from cambrian_core.export.hf import export_hf
from cambrian_core.export.lora import merge_lora
from cambrian_core.export.tpu import consolidate_tpu

__all__ = [
    "consolidate_tpu",
    "convert_dtype",
    "export_hf",
    "import_cambrian1",
    "merge_lora",
    "write_model_card",
]
