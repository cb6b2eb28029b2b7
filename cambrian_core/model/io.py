"""Save a composed model as one self-contained folder and load it back in one call.

Folder layout::

    cambrian_config.json                 the full model config: towers' architecture configs, connector,
                                         LLM keywords (pointing into llm/), stage ...
    llm/                                 the LLM's HF config + tokenizer files (no weights)
    model-00001-of-0000N.safetensors     every weight (towers included), sharded
    model.safetensors.index.json         weight_map (HF layout) + aliases of tied weights

The folder is written next to its destination under a temporary name, fsynced, and renamed into place, so
a crash never leaves a half-written model where a complete one is expected. Loading rebuilds the
architecture from the folder alone (no hub, no original weight files) and the state dict round-trips bit
for bit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file
from torch import nn

from cambrian_core.fileio import staged_folder
from cambrian_core.registry import CONNECTORS, ENCODERS, LLMS, MODELS, BuildError, build

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "ModelFileError",
    "check_folder",
    "check_replaceable",
    "load_model",
    "load_weights",
    "read_config",
    "read_json",
    "read_safetensors",
    "save_model",
]

CONFIG_NAME = "cambrian_config.json"
INDEX_NAME = "model.safetensors.index.json"
FORMAT_VERSION = 1
_HERE = "model_dir://"  # prefix of saved paths that live inside the model folder


def _type_name(registry: Any, value: Any) -> str:
    """Registered name of a config ``type`` (a string already, or a registered class)."""
    if isinstance(value, str):
        return value
    for name in registry.names():
        if registry.get(name) is value:
            return name
    raise ValueError(
        f"cannot save: {value!r} is not registered in the {registry.name} registry, so the saved config could "
        "not rebuild it; register it through a plugin"
    )


def _relocate(value: Any, old: str, new: str) -> Any:
    """Replace the ``old`` path prefix by ``new`` in every string of a nested config."""
    if isinstance(value, Mapping):
        return {k: _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relocate(v, old, new) for v in value]
    if isinstance(value, str) and value.startswith(old):
        return new + value[len(old) :].lstrip("/" + os.sep)
    return value


def saved_config(model: nn.Module, folder: Path) -> dict[str, Any]:
    """The full model config (LLM files written into ``folder/llm``), rebuildable with no other source."""
    cfg = dict(model.model_config)
    towers = []
    for i, tower in enumerate(model.towers):
        name = _type_name(ENCODERS, cfg["vision_tower_aux_list"][i]["type"])
        towers.append({"type": name, **tower.architecture_config()})
    cfg["vision_tower_aux_list"] = towers
    cfg["vision_tower_aux_token_len_list"] = [t.token_len for t in model.towers]
    llm_dir = folder / "llm"
    llm_kwargs = model.llm.save_pretrained(str(llm_dir))
    cfg["llm"] = {"type": _type_name(LLMS, cfg["llm"]["type"]), **_relocate(llm_kwargs, str(folder), _HERE)}
    if isinstance(cfg.get("connector"), Mapping) and "type" in cfg["connector"]:
        cfg["connector"] = {**cfg["connector"], "type": _type_name(CONNECTORS, cfg["connector"]["type"])}
    cfg["stage"] = model.stage
    cfg["gradient_checkpointing"] = bool(model.gradient_checkpointing)
    return {"type": "cambrian", **cfg}


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tied duplicates (same storage, offset, shape, dtype) and copy other shared views."""
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    out, aliases = {}, {}
    for name, t in state.items():
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(
                f"cannot save `{name}`: it is on the meta device (weights were never materialised)"
            )
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:
            t = t.clone()
        storages.add(ptr)
        out[name] = t.contiguous().cpu()
    return out, aliases


def _write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> None:
    from cambrian_core.export.shards import parse_size

    tensors, aliases = _dedupe(state)
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=parse_size(max_shard_size)
    )
    names = dict(split.filename_to_tensors)
    if not split.is_sharded:  # keep one layout: always numbered files and an index
        names = {"model-00001-of-00001.safetensors": names.popitem()[1]} if names else {}
    weight_map = {}
    for filename, keys in names.items():
        save_file({k: tensors[k] for k in keys}, str(folder / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map, "aliases": aliases}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))


def check_replaceable(folder: str | os.PathLike) -> None:
    """Refuse (``FileExistsError``) to replace ``folder`` unless it is absent, empty or a saved cambrian model."""
    dest = Path(folder)
    if not dest.exists():
        return
    if dest.is_dir():
        held = sorted(p.name for p in dest.iterdir())
        if not held or (dest / CONFIG_NAME).is_file() or (dest / INDEX_NAME).is_file():
            return
        what = f"a folder holding other things ({', '.join(held[:5])}{' ...' if len(held) > 5 else ''})"
    else:
        what = "a file"
    raise FileExistsError(
        f"{dest} is {what}, not a saved cambrian model, and saving there would replace all of it; save into a "
        f"new or empty folder (e.g. {dest / 'model'}) or remove it first"
    )


def _peft_wrapped(model: nn.Module) -> bool:
    """Whether any module of ``model`` comes from peft (an adapter that was not merged)."""
    return any(type(m).__module__.split(".")[0] == "peft" for m in model.modules())


def save_model(model: nn.Module, folder: str | os.PathLike, max_shard_size: int | str = "2GB") -> str:
    """Write ``model`` (a ``CambrianModel``) to ``folder`` atomically; returns the folder path.

    ``folder`` may exist when it is empty or holds a saved cambrian model (which is replaced); anything else
    raises ``FileExistsError`` rather than deleting what is there.

    Args:
        max_shard_size: largest safetensors shard (``"2GB"``, ``"500MB"``, ``"512MiB"`` or bytes); a tensor
            larger than that gets a shard of its own.
    """
    dest = Path(folder).resolve()
    check_replaceable(dest)
    if _peft_wrapped(model):
        raise ValueError(
            "cannot save: the LLM carries an unmerged peft (LoRA) adapter, which a saved model cannot restore; "
            "merge it first (model.llm.model = model.llm.model.merge_and_unload(), as "
            "cambrian_core.train.lora.export_lora does), or save the adapter alone with "
            "model.llm.model.save_pretrained(dir) and merge it later with `cambrian export merge-lora`"
        )
    with staged_folder(dest, overwrite=True) as tmp:
        config = saved_config(model, tmp)
        from cambrian_core import __version__

        meta = {"format": "cambrian", "format_version": FORMAT_VERSION, "cambrian_version": __version__}
        try:
            text = json.dumps({**meta, "model": config}, indent=2)
        except TypeError as exc:
            raise ValueError(f"cannot save: the model config is not JSON-serialisable ({exc})") from exc
        (tmp / CONFIG_NAME).write_text(text)
        _write_weights(model.state_dict(), tmp, max_shard_size)
    return str(dest)


class ModelFileError(ValueError):
    """A file of a saved model cannot be read (truncated or corrupt); the message names it."""


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; :class:`ModelFileError` naming the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(
            f"{path} is not valid JSON ({exc}); the file is corrupt or was cut short"
        ) from None


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of one ``.safetensors`` file; :class:`ModelFileError` naming it when it cannot be read."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise ModelFileError(
            f"{path} cannot be read as safetensors ({exc}); it is truncated or corrupt: copy or save it again"
        ) from None


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """The raw ``cambrian_config.json`` of a saved folder, checked: valid JSON, a format and version this
    cambrian reads, and a ``model`` section."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved cambrian model: {CONFIG_NAME} is missing")
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path} holds a JSON {type(meta).__name__}, not a cambrian model config")
    version = meta.get("format_version")
    if meta.get("format") != "cambrian" or not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} version {version!r} is not readable by this cambrian "
            f"(reads format 'cambrian' up to version {FORMAT_VERSION}); upgrade cambrian"
        )
    if not isinstance(meta.get("model"), dict):
        raise ModelFileError(f"{path} has no `model` section; the file is damaged: save the model again")
    return meta


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The model config of a saved folder, with its inner paths made absolute."""
    meta = read_meta(folder)
    root = str(Path(folder).resolve())
    return _relocate(meta["model"], _HERE, root + os.sep)


def read_index(folder: str | os.PathLike) -> dict[str, Any]:
    """A saved folder's ``model.safetensors.index.json``, checked to hold a ``weight_map`` object."""
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder}: {INDEX_NAME} is missing (not a saved cambrian model?)")
    index = read_json(index_path)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise ModelFileError(
            f"{index_path} has no `weight_map` object; the index is damaged: save the model again"
        )
    return index


def check_weights(folder: str | os.PathLike) -> None:
    """Every shard a saved folder's index lists exists, has a readable safetensors header that covers the file,
    and holds the tensors the index places in it (headers only: no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    weight_map = read_index(folder)["weight_map"]
    by_shard: dict[str, set[str]] = {}
    for key, filename in weight_map.items():
        by_shard.setdefault(str(filename), set()).add(key)
    for filename, keys in sorted(by_shard.items()):
        shard = folder / filename
        if not shard.is_file():
            raise FileNotFoundError(f"{folder}: shard {filename} listed in {INDEX_NAME} is missing")
        try:
            with safe_open(str(shard), framework="pt") as f:
                held = set(f.keys())
        except SafetensorError as exc:
            raise ModelFileError(
                f"{shard} cannot be read as safetensors ({exc}); it is truncated or corrupt: copy or save it again"
            ) from None
        if keys - held:
            raise ValueError(
                f"{folder}: tensors {sorted(keys - held)[:5]} are in the index but not in {filename}"
            )


def folder_references(config: Any) -> Iterator[str]:
    """The paths (relative to the saved folder) that ``model_dir://`` values anywhere in ``config`` name."""
    todo: list[Any] = [config]
    while todo:
        value = todo.pop()
        if isinstance(value, Mapping):
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)
        elif isinstance(value, str) and value.startswith(_HERE):
            yield value[len(_HERE) :].lstrip("/" + os.sep)


def check_folder(folder: str | os.PathLike) -> None:
    """A saved folder is complete: a readable config, the files it points to, every shard of its index
    (headers only). Raises ``FileNotFoundError`` / ``ValueError`` naming what is missing or damaged."""
    folder = Path(folder)
    for rel in folder_references(read_meta(folder)["model"]):
        if not (folder / rel).exists():
            raise FileNotFoundError(f"{folder}: {rel} named in {CONFIG_NAME} is missing")
    check_weights(folder)


def load_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a saved folder (tied aliases restored), on the CPU."""
    folder = Path(folder)
    index = read_index(folder)
    state: dict[str, torch.Tensor] = {}
    for filename in sorted(set(index["weight_map"].values())):
        shard = folder / filename
        if not shard.is_file():
            raise FileNotFoundError(f"{folder}: shard {filename} listed in {INDEX_NAME} is missing")
        state.update(read_safetensors(shard))
    missing = set(index["weight_map"]) - set(state)
    if missing:
        raise ValueError(f"{folder}: tensors {sorted(missing)[:5]} are in the index but not in their shards")
    for alias, source in index.get("aliases", {}).items():
        state[alias] = state[source]
    return state


def _match_dtypes(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give each parameter / buffer the dtype it was saved in (so the copy is exact)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    for name, saved in state.items():
        t = named.get(name)
        if t is not None and t.dtype != saved.dtype:
            t.data = t.data.to(saved.dtype)


def missing_parts(config: Mapping[str, Any]) -> list[str]:
    """The parts a saved model config names that no registry holds, all of them (``[]``: it can be built)."""
    from cambrian_core.model.checks import connector_config

    out = []
    for i, tower in enumerate(config.get("vision_tower_aux_list") or []):
        name = tower.get("type") if isinstance(tower, Mapping) else None
        if isinstance(name, str) and name not in ENCODERS:
            out.append(f"encoder `{name}` (vision_tower_aux_list[{i}])")
    try:
        name = connector_config(config).get("type")
    except ValueError:
        name = None
    if isinstance(name, str) and name not in CONNECTORS:
        out.append(f"connector `{name}`")
    llm = config.get("llm")
    name = llm.get("type") if isinstance(llm, Mapping) else None
    if isinstance(name, str) and name not in LLMS:
        out.append(f"LLM `{name}`")
    return out


def load_model(
    path_or_name: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    strict: bool = True,
) -> nn.Module:
    """Load a model from a saved folder or a registered checkpoint name (see ``cambrian models list``).

    Args:
        path_or_name: a folder written by ``save_pretrained``, or a name in the ``CHECKPOINTS`` registry.
        device: where to put the model (default: CPU).
        dtype: cast every floating weight to this dtype after loading (default: as saved): a torch dtype or a
            name (``bf16`` / ``bfloat16``, ``fp16``, ``fp32``).
        strict: every weight of the architecture must be in the folder and vice versa.

    Returns:
        The model, in eval mode.
    """
    from cambrian_core.model.checkpoints import resolve_folder

    folder = resolve_folder(path_or_name)
    config = read_config(folder)
    missing = missing_parts(config)
    if missing:
        raise BuildError(
            f"{folder} needs parts that no installed plugin provides: {'; '.join(missing)}. Install the packages "
            "that register them (`cambrian plugins list` shows what is installed and what failed to load)"
        )
    state = load_weights(folder)
    with torch.random.fork_rng(devices=[]):  # building initialises weights randomly: keep the caller's RNG
        model = build(MODELS, config)
    _match_dtypes(model, state)
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        want = model.state_dict()
        missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        wrong = sorted(k for k in set(want) & set(state) if want[k].shape != state[k].shape)
        raise ModelFileError(
            f"{folder}: its weights do not fit the model its {CONFIG_NAME} builds: {len(missing)} missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of another shape "
            f"{wrong[:3]}; it was saved from another model (one with an unmerged LoRA adapter?) or edited since: "
            "save it again" + ("" if wrong or not strict else ", or load what fits with strict=False")
        ) from exc
    if not strict and (result.missing_keys or result.unexpected_keys):
        import logging

        logging.getLogger(__name__).warning(
            "loading %s: %d missing and %d unexpected weights",
            folder,
            len(result.missing_keys),
            len(result.unexpected_keys),
        )
    if dtype is not None:
        from cambrian_core.export.dtype import check_cast, narrows_range, resolve_dtype

        target = (
            dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)[0]
        )  # "bf16", "bfloat16" ...
        for key, t in state.items():  # refuse a cast that turns weights into inf (fp16)
            if t.is_floating_point() and narrows_range(t.dtype, target):
                check_cast(key, t, target)
        model.to(target)
    if device is not None:
        model.to(device)
    return model.eval()
