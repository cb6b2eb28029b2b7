"""Convert a saved cambrian model to another floating dtype (``cambrian export convert-dtype``).

Every floating tensor is cast (integer and boolean buffers are kept), shard by shard, and the ``dtype``
keywords of the towers and the LLM in ``cambrian_config.json`` are updated so the config says what the
weights are.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from cambrian_core.export.shards import INDEX_NAME, ShardWriter, iter_state
from cambrian_core.fileio import staged_folder

__all__ = ["DTYPE_NAMES", "convert_dtype", "copy_model_files", "resolve_dtype", "saved_folder"]

#: accepted spellings -> (torch dtype, the name configs use)
DTYPE_NAMES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "float32"),
    "fp32": (torch.float32, "float32"),
    "float": (torch.float32, "float32"),
    "bfloat16": (torch.bfloat16, "bfloat16"),
    "bf16": (torch.bfloat16, "bfloat16"),
    "float16": (torch.float16, "float16"),
    "fp16": (torch.float16, "float16"),
    "half": (torch.float16, "float16"),
}


def resolve_dtype(name: str | torch.dtype) -> tuple[torch.dtype, str]:
    """``"bf16"`` -> ``(torch.bfloat16, "bfloat16")``; unknown names raise with the accepted list."""
    if isinstance(name, torch.dtype):
        for dt, canonical in DTYPE_NAMES.values():
            if dt == name:
                return dt, canonical
    elif name.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[name.lower()]
    raise ValueError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPE_NAMES)}")


def saved_folder(path_or_name: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """A saved cambrian folder (path or registered name) and its raw ``cambrian_config.json``, checked before
    anything is written from it: a readable config, and every shard of its index present and readable."""
    from cambrian_core.model.checkpoints import resolve_folder
    from cambrian_core.model.io import check_weights, read_meta

    folder = resolve_folder(path_or_name)
    meta = read_meta(folder)
    check_weights(folder)
    return folder, meta


def copy_model_files(src: Path, dst: Path, skip: set[str]) -> None:
    """Copy everything of ``src`` except its weights, its index and the names in ``skip``."""
    for item in src.iterdir():
        if item.name in skip or item.name == INDEX_NAME or item.name.endswith(".safetensors"):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)


def _set_dtype(model_cfg: dict[str, Any], name: str) -> None:
    for tower in model_cfg.get("vision_tower_aux_list") or []:
        if "dtype" in tower:
            tower["dtype"] = name
    llm = model_cfg.get("llm") or {}
    if "dtype" in llm:
        llm["dtype"] = name


def convert_dtype(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    dtype: str | torch.dtype,
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Write a copy of the saved model ``src`` whose floating weights are ``dtype``; returns ``out``."""
    from cambrian_core.model.io import CONFIG_NAME

    target, name = resolve_dtype(dtype)
    folder, meta = saved_folder(src)
    index = json.loads((folder / INDEX_NAME).read_text())
    with staged_folder(out, overwrite=overwrite) as tmp:
        copy_model_files(folder, tmp, skip={CONFIG_NAME})
        _set_dtype(meta["model"], name)
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        writer = ShardWriter(tmp, max_shard_size, always_index=True)
        for _, tensors in iter_state(folder):
            for key, t in tensors.items():
                writer.add(key, t.to(target) if t.is_floating_point() else t)
        writer.finish(aliases=index.get("aliases"))
    return Path(out).expanduser().resolve()
