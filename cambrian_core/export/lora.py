"""``cambrian export merge-lora``: fold a LoRA adapter into the LLM's weights and save a plain model.

The adapter comes from either a training checkpoint of a ``lora=dict(...)`` run (``step_*/trainable.safetensors``
+ the run's ``config.json``; the adapter is re-created with the run's settings and every trained weight, the
connector's included, is loaded) or a peft adapter folder (``adapter_config.json``, e.g. the ``lora_adapter/``
a QLoRA run exports). A QLoRA adapter is merged into the full-precision base (the usual way to publish one).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from cambrian_core.fileio import staged_folder

__all__ = ["LoraMergeError", "load_adapter", "merge_lora"]


class LoraMergeError(ValueError):
    """The adapter does not fit the base model (offending names listed)."""


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise ImportError("merging LoRA needs peft: pip install peft") from exc


def _listing(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def load_adapter(model: torch.nn.Module, adapter: str | os.PathLike[str]) -> str:
    """Wrap ``model``'s LLM with the adapter at ``adapter`` (checkpoint or peft folder); returns what was loaded."""
    from safetensors.torch import load_file

    from cambrian_core.train.lora import LoraSettings, apply_lora

    _require_peft()
    path = Path(adapter)
    if (path / "trainable.safetensors").is_file():
        run = path / "config.json"
        lora = json.loads(run.read_text()).get("lora") if run.is_file() else None
        if not lora:
            raise LoraMergeError(f"{run} has no `lora` section: {path} is not a checkpoint of a LoRA run")
        settings = dataclasses.replace(LoraSettings.from_config(lora), qlora=False)
        apply_lora(model, settings)
        state = load_file(str(path / "trainable.safetensors"))
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # size mismatches
            raise LoraMergeError(
                f"{path}: the checkpoint does not fit the base model / LoRA settings: {exc}"
            ) from exc
        if result.unexpected_keys:
            raise LoraMergeError(
                f"{path}: weights the base model has no place for (another base or LoRA config?): "
                f"{_listing(result.unexpected_keys)}"
            )
        lacking = [k for k in result.missing_keys if "lora_" in k]
        if lacking:
            raise LoraMergeError(f"{path}: the checkpoint lacks adapter weights {_listing(lacking)}")
        return f"{len(state)} trained weights (LoRA r={settings.r}, alpha={settings.alpha}) from {path.name}"
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        try:
            model.llm.model = PeftModel.from_pretrained(model.llm.model, str(path), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise LoraMergeError(
                f"{path}: the peft adapter does not fit the base model's LLM: {exc}"
            ) from exc
        return f"peft adapter {path.name}"
    raise FileNotFoundError(
        f"{path} is neither a training checkpoint (trainable.safetensors + config.json) nor a peft adapter folder "
        "(adapter_config.json)"
    )


def merge_lora(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Load the saved model ``base``, apply ``adapter``, merge it into the LLM and save the result to ``out``."""
    from cambrian_core.export.card import write_model_card
    from cambrian_core.model.io import load_model

    model = load_model(base)
    what = load_adapter(model, adapter)
    model.llm.model = model.llm.model.merge_and_unload()
    with staged_folder(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        write_model_card(
            tmp, sources_from=Path(adapter), title=Path(out).name, notes=[f"LoRA merged: {what}."]
        )
    return Path(out).expanduser().resolve()
