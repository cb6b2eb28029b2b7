"""Export any cambrian model as a ``trust_remote_code=True`` Hugging Face folder.

The folder is a saved cambrian model (``cambrian_config.json``, ``llm/``, safetensors) plus ``config.json``
(``model_type: cambrian`` with an ``auto_map``), ``configuration_cambrian.py`` and ``modeling_cambrian.py`` and
the tokenizer files at the top. The remote code imports the installed ``cambrian_core`` and loads the folder
with :func:`cambrian_core.model.io.load_model`, so ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` runs exactly our model (same forward, same KV-cache generate).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from cambrian_core.export.dtype import check_cast, copy_model_files, resolve_dtype
from cambrian_core.export.shards import INDEX_NAME, ShardWriter, iter_state
from cambrian_core.fileio import staged_folder

__all__ = ["REMOTE_FILES", "export_remote_model", "write_remote_folder"]

REMOTE_FILES = ("configuration_cambrian.py", "modeling_cambrian.py")
_CODE_DIR = Path(__file__).with_name("remote_code")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def _write_hf_files(folder: Path, model_cfg: dict[str, Any]) -> None:
    import transformers

    for name in REMOTE_FILES:
        shutil.copy2(_CODE_DIR / name, folder / name)
    config = {
        "model_type": "cambrian",
        "architectures": ["CambrianForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_cambrian.CambrianConfig",
            "AutoModel": "modeling_cambrian.CambrianForCausalLM",
            "AutoModelForCausalLM": "modeling_cambrian.CambrianForCausalLM",
        },
        "cambrian": model_cfg,
        "transformers_version": transformers.__version__,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in _TOKENIZER_FILES:
        if (folder / "llm" / name).is_file():
            shutil.copy2(folder / "llm" / name, folder / name)


def write_remote_folder(
    src: Path, folder: Path, dtype: str | torch.dtype | None = None, max_shard_size: int | str = "5GB"
) -> None:
    """Fill ``folder`` (existing, empty) with the remote-code export of the saved model folder ``src``."""
    from cambrian_core.export.dtype import _set_dtype
    from cambrian_core.model.io import CONFIG_NAME

    meta = json.loads((src / CONFIG_NAME).read_text())
    if dtype is None:
        copy_model_files(src, folder, skip=set())
        for f in src.glob("*.safetensors"):
            shutil.copy2(f, folder / f.name)
        shutil.copy2(src / INDEX_NAME, folder / INDEX_NAME)
    else:
        target, name = resolve_dtype(dtype)
        copy_model_files(src, folder, skip={CONFIG_NAME})
        _set_dtype(meta["model"], name)
        (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        writer = ShardWriter(folder, max_shard_size, always_index=True)
        for _, tensors in iter_state(src):
            writer.add_all((k, check_cast(k, t, target)) for k, t in tensors.items())
        writer.finish(aliases=json.loads((src / INDEX_NAME).read_text()).get("aliases"))
    _write_hf_files(folder, meta["model"])


def export_remote_model(
    model: torch.nn.Module,
    out: str | os.PathLike[str],
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Save an in-memory cambrian model as a remote-code folder at ``out``."""
    from cambrian_core.model.io import CONFIG_NAME

    with staged_folder(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        _write_hf_files(tmp, json.loads((tmp / CONFIG_NAME).read_text())["model"])
    return Path(out).expanduser().resolve()
