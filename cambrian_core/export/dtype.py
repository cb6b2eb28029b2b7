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

__all__ = [
    "DTYPE_NAMES",
    "check_cast",
    "convert_dtype",
    "copy_model_files",
    "narrows_range",
    "resolve_dtype",
    "saved_folder",
]

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


def narrows_range(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether casting floating ``source`` to ``target`` can overflow: a smaller exponent range (float16 from
    float32 or bfloat16; bfloat16 keeps float32's)."""
    return target.is_floating_point and torch.finfo(target).max < torch.finfo(source).max / 2


def check_cast(name: str, tensor: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    """``tensor`` cast to ``target`` (a floating one; other tensors are returned as they are).

    Raises:
        ValueError: the cast overflows (finite values become inf: float16 holds up to 65504), naming the
            tensor and its largest value. Values flushed to zero are logged when over 1% of the tensor's.
    """
    if not tensor.is_floating_point():
        return tensor
    out = tensor.to(target)
    if not narrows_range(tensor.dtype, target):
        return out
    finite = torch.isfinite(tensor)
    overflow = int((finite & ~torch.isfinite(out)).sum())
    flushed = int(((tensor != 0) & (out == 0)).sum())
    short = str(target).removeprefix("torch.")
    if overflow:
        big = float(tensor[finite].abs().max())
        raise ValueError(
            f"casting `{name}` to {short} turns {overflow} of its values into inf (max |value| {big:.4g}; "
            f"{short} holds up to {torch.finfo(target).max:.6g})"
            + (f" and {flushed} tiny ones into 0" if flushed else "")
            + "; use bf16 instead (the float32 range in 16 bits)"
        )
    if flushed > 0.01 * tensor.numel():
        import logging

        logging.getLogger(__name__).warning(
            "casting `%s` to %s turns %d of its %d values into 0 (too small for it); bf16 keeps them",
            name,
            short,
            flushed,
            tensor.numel(),
        )
    return out


def _model_folders(src: Path) -> set[str]:
    """The sub-folders a saved model is made of: ``llm`` and every folder its config points into."""
    from cambrian_core.model.io import CONFIG_NAME, folder_references

    names = {"llm"}
    try:
        config = json.loads((src / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return names
    for rel in folder_references(config):
        first = Path(rel).parts[:1]
        if first and (src / first[0]).is_dir():
            names.add(first[0])
    return names


def copy_model_files(src: Path, dst: Path, skip: set[str]) -> None:
    """Copy the files of a saved model ``src`` but its weights, its index and the names in ``skip``: every file
    at the top and the sub-folders the model is made of (not other folders, such as an export written inside
    ``src`` or its temporary folder)."""
    folders = _model_folders(src)
    inside = dst.resolve()
    for item in src.iterdir():
        if item.name in skip or item.name == INDEX_NAME or item.name.endswith(".safetensors"):
            continue
        if item.is_dir():
            if item.name not in folders:
                continue
            if inside.is_relative_to(item.resolve()):
                raise ValueError(
                    f"{dst} is inside {item}, a part of the model being copied; write the export elsewhere"
                )
            shutil.copytree(item, dst / item.name)
        elif item.is_file():
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
                writer.add(key, check_cast(key, t, target))
        writer.finish(aliases=index.get("aliases"))
    return Path(out).expanduser().resolve()
