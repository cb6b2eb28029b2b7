"""LoRA and QLoRA for the LLM through peft (reference §C.2: r 64, alpha 16, dropout 0.05, all linear layers).

``lora=dict(r=64, alpha=16, dropout=0.05)`` in a config wraps the LLM's Hugging Face model with a peft LoRA
adapter after the stage has set what trains: the LLM's own weights freeze, the adapter and the connector
train. ``qlora=True`` first swaps the decoder's linear layers for bitsandbytes 4-bit NF4 layers (CUDA only).
At export the adapter is merged back (LoRA), or saved on its own next to the model (QLoRA).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from cambrian_core.config.schema import LoraSection

__all__ = ["LoraSettings", "apply_lora", "export_lora", "quantize_4bit"]

log = logging.getLogger(__name__)


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
    """Replace every ``nn.Linear`` under ``module`` (except the LM head) by a bitsandbytes NF4 ``Linear4bit``.

    Returns the number of layers replaced. Needs bitsandbytes and a CUDA device.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError("lora.qlora=True needs bitsandbytes: pip install bitsandbytes (CUDA only)") from exc
    if device.type != "cuda":
        raise RuntimeError(f"lora.qlora=True needs a CUDA device (4-bit kernels), this run uses {device}")
    count = 0
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            full = f"{name}.{attr}" if name else attr
            if isinstance(sub, nn.Linear) and not full.endswith("lm_head"):
                q = bnb.nn.Linear4bit(
                    sub.in_features,
                    sub.out_features,
                    bias=sub.bias is not None,
                    compute_dtype=compute_dtype,
                    quant_type="nf4",
                )
                q.weight = bnb.nn.Params4bit(sub.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if sub.bias is not None:
                    q.bias = nn.Parameter(sub.bias.data.clone(), requires_grad=False)
                setattr(child, attr, q.to(device))
                count += 1
    return count


def apply_lora(model: nn.Module, settings: LoraSettings, device: torch.device | None = None) -> str:
    """Wrap ``model.llm.model`` with a LoRA adapter (after ``set_stage``); returns a one-line summary."""
    peft = _require_peft()
    hf = model.llm.model
    if settings.qlora:
        dtype = getattr(torch, settings.compute_dtype)
        n = quantize_4bit(hf, dtype, device or torch.device("cpu"))
        hf = peft.prepare_model_for_kbit_training(hf, use_gradient_checkpointing=False)
        log.info("QLoRA: %d linear layers of the LLM quantised to 4-bit NF4", n)
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
    return f"LoRA r={settings.r} alpha={settings.alpha} on {settings.target_modules}: {adapter:,} adapter weights"


def export_lora(model: nn.Module, settings: LoraSettings, adapter_dir: str) -> bool:
    """Prepare ``model`` for ``save_pretrained``: merge the adapter (LoRA) and return ``True``; for QLoRA save
    the adapter alone to ``adapter_dir`` and return ``False`` (a 4-bit base is not exported)."""
    if settings.qlora:
        model.llm.model.save_pretrained(adapter_dir)
        return False
    model.llm.model = model.llm.model.merge_and_unload()
    return True
