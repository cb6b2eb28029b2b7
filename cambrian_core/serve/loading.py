"""Choosing the device and dtype, naming a model, and loading what ``--model`` / ``--model-path`` points at.

Accepted: a folder written by ``save_pretrained``, a registered checkpoint name (``cambrian models list``), or a
Cambrian-1 Hugging Face folder (its ``config.json`` lists ``mm_vision_tower_aux_list``), which is imported on the
fly by :mod:`cambrian_core.export.cambrian1` into a cache folder (its vision towers located with ``--tower-path``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "is_cambrian1_folder",
    "load_for_serving",
    "model_display_name",
    "parse_tower_paths",
    "pick_device",
    "pick_dtype",
]

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(flag: str = "auto") -> str:
    """``auto`` -> ``cuda`` if available, else ``mps``, else ``cpu``; an explicit device must exist."""
    flag = (flag or "auto").strip().lower()
    if flag == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    kind = flag.split(":", 1)[0]
    if kind not in DEVICES:
        raise ValueError(f"--device {flag!r} is unknown; use one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible here; use --device cpu or auto")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps: Metal (MPS) is not available here; use --device cpu or auto")
    return flag


def pick_dtype(flag: str, device: str) -> torch.dtype | None:
    """``auto`` -> bfloat16 on CUDA, float16 on MPS, the saved dtype on CPU; else the named dtype."""
    flag = (flag or "auto").strip().lower()
    if flag == "auto":
        kind = device.split(":", 1)[0]
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(kind)
    if flag not in DTYPES:
        raise ValueError(f"--dtype {flag!r} is unknown; use auto or one of {', '.join(DTYPES)}")
    return DTYPES[flag]


def model_display_name(path_or_name: str) -> str:
    """The name clients use: a registered name as is; a folder's last component (``<parent>_checkpoint-N`` for
    trainer checkpoint folders, as LLaVA names them)."""
    p = Path(str(path_or_name)).expanduser()
    if not p.exists():
        return str(path_or_name)
    p = p.resolve()  # "." and "model/" name the folder itself
    if re.fullmatch(r"checkpoint-\d+", p.name):
        return f"{p.parent.name}_{p.name}"
    return p.name


def is_cambrian1_folder(path: str | os.PathLike[str]) -> bool:
    """A Hugging Face folder of a released Cambrian-1 model (not one of ours)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file() or (Path(path) / "cambrian_config.json").is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    archs = " ".join(data.get("architectures") or []).lower()
    return "mm_vision_tower_aux_list" in data or "cambrian" in archs


def parse_tower_paths(items: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``["NAME=DIR", ...]`` (the ``--tower-path`` flag) -> ``{NAME: DIR}``."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return {str(k): str(v) for k, v in items.items()}
    out = {}
    for item in items:
        name, sep, path = item.rpartition("=")
        if not sep or not name or not path:
            raise ValueError(
                f"--tower-path {item!r}: expected NAME=DIR, e.g. openai/clip-vit-large-patch14-336=/models/clip"
            )
        out[name] = path
    return out


def _import_cambrian1(folder: Path, tower_paths: dict[str, str]) -> Path:
    try:
        exporter = importlib.import_module("cambrian_core.export.cambrian1")
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"{folder} is a Cambrian-1 Hugging Face folder, but this installation has no Cambrian-1 importer "
            "(cambrian_core.export.cambrian1)"
        ) from None
    from cambrian_core.model.checkpoints import cache_dir

    # the files' names, sizes and times are part of the key: weights rewritten in place are imported again
    key = hashlib.sha256(
        json.dumps(
            [
                str(folder.resolve()),
                sorted(tower_paths.items()),
                _fingerprint([folder, *map(Path, tower_paths.values())]),
            ]
        ).encode()
    ).hexdigest()
    dst = cache_dir() / "imported" / f"{folder.name}-{key[:16]}"
    if not (dst / "cambrian_config.json").is_file():
        log.info("importing the Cambrian-1 folder %s into %s", folder, dst)
        try:
            exporter.import_cambrian1(str(folder), str(dst), tower_paths, overwrite=True)
        except (ValueError, FileNotFoundError) as exc:
            hint = (
                ". Cambrian-1 folders hold no vision-tower weights: give each tower's local weights with "
                "--tower-path NAME=DIR"
                if "tower" in str(exc).lower()
                else ""
            )
            raise ValueError(
                f"{folder} is a Cambrian-1 folder and could not be imported: {exc}{hint}"
            ) from exc
    return dst


def _fingerprint(folders: Sequence[Path]) -> list[list[Any]]:
    """``[relative path, size, mtime_ns]`` of every file below ``folders`` (stat only, nothing is read)."""
    out = []
    for k, root in enumerate(folders):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            st = f.stat()
            out.append([k, str(f.relative_to(root)) if f != root else f.name, st.st_size, st.st_mtime_ns])
    return out


def load_for_serving(
    path_or_name: str,
    device: str = "auto",
    dtype: str = "auto",
    tower_paths: Sequence[str] | Mapping[str, str] | None = None,
    quantize: int | None = None,
) -> Any:
    """Load a model for inference on ``device`` (see :func:`pick_device`), in eval mode.

    ``tower_paths`` (``NAME=DIR`` strings or a dict) locate the vision towers of a Cambrian-1 folder.
    ``quantize`` (8 or 4, the ``--load-8bit`` / ``--load-4bit`` flags): the LLM's decoder linear layers in
    bitsandbytes int8 / NF4 (:mod:`cambrian_core.model.quantize`); everything else keeps ``dtype``.
    """
    from cambrian_core.model.io import load_model

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    if quantize is not None:
        from cambrian_core.model.quantize import QUANT_BITS, require_bitsandbytes

        if quantize not in QUANT_BITS:
            raise ValueError(f"quantize must be 8 or 4 (--load-8bit / --load-4bit), got {quantize!r}")
        if dev.startswith("mps"):
            raise ValueError(
                f"--load-{quantize}bit: bitsandbytes has no Metal (MPS) kernels; use --device cpu"
            )
        require_bitsandbytes(f"--load-{quantize}bit")
    source: Any = path_or_name
    p = Path(str(path_or_name)).expanduser()
    if p.is_dir() and is_cambrian1_folder(p):
        source = _import_cambrian1(p, parse_tower_paths(tower_paths))
    elif p.is_dir():
        source = str(p)
    log.info("loading %s on %s (%s)", path_or_name, dev, torch_dtype or "saved dtype")
    if quantize is None:
        return load_model(str(source), device=dev, dtype=torch_dtype)
    from cambrian_core.model.quantize import quantize_linears

    model = load_model(str(source), dtype=torch_dtype)  # on the CPU: weights are quantized as they move
    compute = model.llm.model.get_input_embeddings().weight.dtype
    n = quantize_linears(model.llm.model, quantize, compute, what=f"--load-{quantize}bit")
    log.info("%d linear layers of the LLM in %d bits", n, quantize)
    return model.to(dev).eval()
