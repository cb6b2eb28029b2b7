"""LoRA and QLoRA for the LLM through peft (reference §C.2: r 64, alpha 16, dropout 0.05, all linear layers).

``lora=dict(r=64, alpha=16, dropout=0.05)`` in a config wraps the LLM's Hugging Face model with a peft LoRA
adapter after the stage has set what trains: the LLM's own weights freeze, the adapter and the connector
train. ``qlora=True`` first swaps the decoder's linear layers for bitsandbytes 4-bit NF4 layers (CUDA, or the CPU).
At export the adapter is merged back (LoRA), or saved on its own next to the model (QLoRA).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cambrian_core.config.schema import LoraSection

__all__ = ["LoraSettings", "apply_lora", "export_lora", "quantize_4bit"]


#: the ``lora`` config section (defined with the other sections, so the config check sees its keys)
LoraSettings = LoraSection


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ImportError(
            "a `lora` section needs peft: pip install 'cambrian[lora]' (or pip install peft)"
        ) from exc
    return peft


def quantize_4bit(module: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Swap every ``nn.Linear`` under ``module`` (except the LM head) for a bitsandbytes NF4 ``Linear4bit`` and
    move it to ``device`` (where the weights are quantized); returns the number of layers replaced."""
    from cambrian_core.model.quantize import quantize_linears

    count = quantize_linears(module, 4, compute_dtype, what="lora.qlora=True")
    module.to(device)
    return count


def apply_lora(model: nn.Module, settings: LoraSettings, device: torch.device | None = None) -> str:
    """Wrap ``model.llm.model`` with a LoRA adapter (after ``set_stage``); returns a one-line summary."""
    peft = _require_peft()
    hf = model.llm.model
    quantized = ""
    if settings.qlora:
        dtype = getattr(torch, settings.compute_dtype)
        n = quantize_4bit(hf, dtype, device or torch.device("cpu"))
        hf = peft.prepare_model_for_kbit_training(hf, use_gradient_checkpointing=False)
        quantized = (
            f"QLoRA: {n} linear layers of the LLM in 4-bit NF4 (computing in {settings.compute_dtype}); "
        )
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model.llm.model = peft.get_peft_model(hf, config)
    adapter = sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" in n)
    return (
        f"{quantized}LoRA r={settings.r} alpha={settings.alpha} on {settings.target_modules}: "
        f"{adapter:,} adapter weights"
    )


def export_lora(model: nn.Module, settings: LoraSettings, adapter_dir: str) -> bool:
    """Prepare ``model`` for ``save_pretrained``: merge the adapter (LoRA) and return ``True``; for QLoRA save
    the adapter alone to ``adapter_dir`` and return ``False`` (a 4-bit base is not exported)."""
    if settings.qlora:
        model.llm.model.save_pretrained(adapter_dir)
        return False
    model.llm.model = model.llm.model.merge_and_unload()
    return True
