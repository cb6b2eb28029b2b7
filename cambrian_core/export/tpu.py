"""Consolidate Cambrian-1's per-rank TPU (XLA FSDP) checkpoints into one Hugging Face style folder (§D.1, §D.2).

Each rank wrote ``<prefix>_rank-RRRRRRRR-of-WWWWWWWW<suffix>`` = ``{"model": its sharded state dict,
"shard_metadata": model.get_shard_metadata()}``. A sharded parameter is stored under a name with an
``_fsdp_shard...`` segment; ``shard_metadata["shard_info"][prefix][segment]`` gives its original name and
size. Its full value is the concatenation of every rank's shard (dim 0), trimmed of the padding: cut to the
original element count and reshaped for flattened shards, sliced on dim 0 for ``shard_param_on_dim_0``.
Flattened parameters (``..._fsdp_wrapped_module.flat_param_<i>``) are then split into the original
parameters with ``flatten_info`` (names, shapes, element counts); finally the ``_fsdp_wrapped_module.`` and
``_fpw_module.`` wrappers are dropped from the names. Unsharded entries (buffers) come from rank 0, cast back
to their ``buffer_info`` dtype.

Unlike the seed recipe's ``transfer.py`` (which kept one rank's shard), every rank is read, and the result is
verified: all ranks present once, one world size, identical key sets, shard shapes that agree, every
``shard_info`` / ``flatten_info`` entry used, every parameter produced exactly once.

Files are read with ``torch.load(weights_only=True)``: the metadata holds only plain containers, strings,
ints, ``torch.Size`` and ``torch.dtype``, which PyTorch's safe unpickler accepts without any allowlist.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cambrian_core.export.shards import ShardWriter, torch_load
from cambrian_core.fileio import staged_folder

__all__ = [
    "ShardFile",
    "TPUConsolidationError",
    "consolidate_state_dicts",
    "consolidate_tpu",
    "find_shard_sets",
]

_RANK_RE = re.compile(r"^(?P<prefix>.*?)_?rank-(?P<rank>\d+)-of-(?P<world>\d+)(?P<suffix>.*)$")
#: file prefixes that hold optimizer or RNG state, never model weights
_NOT_WEIGHTS = ("opt", "rng")
_WRAPPERS = ("_fsdp_wrapped_module.", "_fpw_module.")
_LIMIT = 20


class TPUConsolidationError(ValueError):
    """The shard files are incomplete or inconsistent (the message names the ranks / keys)."""


@dataclass(frozen=True)
class ShardFile:
    """One rank's file."""

    path: Path
    rank: int
    world: int


def _listing(items: Sequence[Any], limit: int = _LIMIT) -> str:
    shown = ", ".join(str(i) for i in list(items)[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def find_shard_sets(folder: str | os.PathLike[str]) -> dict[str, list[ShardFile]]:
    """Rank files of ``folder`` grouped by name pattern (``"model_ckpt_rank-*-of-*.pth"`` -> files)."""
    groups: dict[str, list[ShardFile]] = defaultdict(list)
    for path in sorted(Path(folder).iterdir()):
        m = _RANK_RE.match(path.name)
        if m is None or not path.is_file():
            continue
        sep = "_" if path.name[len(m.group("prefix")) : len(m.group("prefix")) + 1] == "_" else ""
        pattern = f"{m.group('prefix')}{sep}rank-*-of-*{m.group('suffix')}"
        groups[pattern].append(ShardFile(path, int(m.group("rank")), int(m.group("world"))))
    return dict(groups)


def _pick_set(folder: Path, pattern: str | None) -> tuple[str, list[ShardFile]]:
    groups = find_shard_sets(folder)
    if not groups:
        raise FileNotFoundError(
            f"{folder} has no per-rank shard files (`<prefix>_rank-XXXXXXXX-of-YYYYYYYY.pth`)"
        )
    if pattern is not None:
        if pattern not in groups:
            raise TPUConsolidationError(
                f"{folder} has no files matching {pattern!r}; found: {_listing(sorted(groups))}"
            )
        return pattern, groups[pattern]
    weights = {k: v for k, v in groups.items() if not k.startswith(_NOT_WEIGHTS)}
    if len(weights) != 1:
        raise TPUConsolidationError(
            f"{folder} holds several sets of rank files ({_listing(sorted(weights or groups))}); choose one with "
            "--pattern"
        )
    return next(iter(weights.items()))


def _check_ranks(pattern: str, files: list[ShardFile]) -> int:
    worlds = sorted({f.world for f in files})
    if len(worlds) != 1:
        by_world = {w: [f.path.name for f in files if f.world == w] for w in worlds}
        raise TPUConsolidationError(f"{pattern}: files disagree on the world size: {by_world}")
    world = worlds[0]
    ranks = [f.rank for f in files]
    missing = sorted(set(range(world)) - set(ranks))
    dupes = sorted({r for r in ranks if ranks.count(r) > 1})
    extra = sorted({r for r in ranks if r >= world})
    problems = []
    if missing:
        problems.append(f"missing ranks {_listing(missing)} of {world}")
    if dupes:
        problems.append(f"ranks {_listing(dupes)} appear more than once")
    if extra:
        problems.append(f"ranks {_listing(extra)} are >= the world size {world}")
    if problems:
        raise TPUConsolidationError(f"{pattern}: " + "; ".join(problems))
    return world


def _load_rank(f: ShardFile) -> tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]:
    import pickle

    try:
        payload = torch_load(f.path)
    except pickle.UnpicklingError as exc:
        raise TPUConsolidationError(
            f"{f.path.name}: holds objects other than tensors and plain containers, so it is not read "
            f"(torch.load weights_only=True refused: {str(exc).splitlines()[0]})"
        ) from exc
    if not isinstance(payload, Mapping) or "model" not in payload or "shard_metadata" not in payload:
        keys = list(payload) if isinstance(payload, Mapping) else type(payload).__name__
        raise TPUConsolidationError(
            f"{f.path.name}: expected a dict with 'model' and 'shard_metadata', got {keys}"
        )
    meta = payload["shard_metadata"]
    if meta.get("rank") is not None and (int(meta["rank"]), int(meta.get("world_size", f.world))) != (
        f.rank,
        f.world,
    ):
        raise TPUConsolidationError(
            f"{f.path.name}: its shard_metadata says rank {meta['rank']} of {meta.get('world_size')}, its name says "
            f"rank {f.rank} of {f.world}; files were renamed or mixed up"
        )
    return payload["model"], meta


def _split_shard_name(name: str) -> tuple[str, str] | None:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_fsdp_shard"):
            return ".".join(parts[:i]), ".".join(parts[i:])
    return None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _clean(name: str) -> str:
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def _orig_dtype(info: Any) -> torch.dtype | None:
    if isinstance(info, torch.dtype):
        return info
    if isinstance(info, Mapping) and isinstance(info.get("_orig_dtype"), torch.dtype):
        return info["_orig_dtype"]
    return None


def consolidate_state_dicts(
    states: Sequence[Mapping[str, torch.Tensor]], metadata: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The full state dict from every rank's sharded state dict (rank order) and the shard metadata.

    Raises:
        TPUConsolidationError: key sets, shard shapes or metadata disagree; a parameter is missing or produced
            twice (all offending names listed).
    """
    world = len(states)
    keys0 = list(states[0])
    problems: list[str] = []
    for r, s in enumerate(states[1:], start=1):
        lacking = [k for k in keys0 if k not in s]
        extra = [k for k in s if k not in states[0]]
        if lacking:
            problems.append(f"rank {r} lacks {_listing(lacking)}")
        if extra:
            problems.append(f"rank {r} has keys rank 0 lacks: {_listing(extra)}")
    if problems:
        raise TPUConsolidationError("ranks hold different parameters: " + "; ".join(problems))
    shard_info = metadata.get("shard_info") or {}
    flatten_info = metadata.get("flatten_info") or {}
    buffer_info = metadata.get("buffer_info") or {}
    full: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    used_shards: set[tuple[str, str]] = set()
    duplicates, unknown, bad_shapes, differing = [], [], [], []

    def put(name: str, value: torch.Tensor, source: str) -> None:
        if name in full:
            duplicates.append(f"{_clean(name)} (from {origin[name]} and {source})")
            return
        full[name] = value
        origin[name] = source

    for key in keys0:
        split = _split_shard_name(key)
        if split is None:
            value = states[0][key]
            if any(not torch.equal(s[key], value) for s in states[1:]):
                differing.append(key)
            dtype = _orig_dtype(buffer_info.get(key)) or _orig_dtype(buffer_info.get(_clean(key)))
            put(key, value.to(dtype) if dtype is not None else value, key)
            continue
        prefix, seg = split
        info = (shard_info.get(prefix) or {}).get(seg)
        if info is None:
            unknown.append(key)
            continue
        used_shards.add((prefix, seg))
        shapes = {tuple(s[key].shape) for s in states}
        if len(shapes) != 1:
            bad_shapes.append(
                f"{key}: shard shapes differ across ranks {[tuple(s[key].shape) for s in states]}"
            )
            continue
        size = tuple(int(d) for d in info["_orig_size"])
        cat = torch.cat([s[key] for s in states], dim=0)
        if cat.dim() == 1 and len(size) != 1:
            if cat.numel() < _numel(size):
                bad_shapes.append(
                    f"{key}: {world} shards hold {cat.numel()} elements, {info['_orig_name']} needs {_numel(size)}"
                )
                continue
            value = cat[: _numel(size)].view(size)
        else:  # shard_param_on_dim_0 (or a 1-D parameter)
            if tuple(cat.shape[1:]) != size[1:] or cat.shape[0] < size[0]:
                bad_shapes.append(
                    f"{key}: {world} shards make {tuple(cat.shape)}, {info['_orig_name']} is {size}"
                )
                continue
            value = cat[: size[0]]
        name = f"{prefix}.{info['_orig_name']}" if prefix else str(info["_orig_name"])
        put(name, value, key)
    unused = [
        f"{p}.{s}" if p else s for p, infos in shard_info.items() for s in infos if (p, s) not in used_shards
    ]
    used_flat: set[str] = set()
    for name in [n for n in full if "_fsdp_wrapped_module.flat_param_" in n]:
        meta = flatten_info.get(name)
        if meta is None:
            unknown.append(f"{name} (no flatten_info entry)")
            continue
        used_flat.add(name)
        flat = full.pop(name)
        source = origin.pop(name)
        names, shapes, numels = meta
        if sum(int(n) for n in numels) != flat.numel():
            bad_shapes.append(
                f"{name}: flatten_info lists {sum(numels)} elements, the parameter has {flat.numel()}"
            )
            continue
        base = name.rsplit(".", 1)[0]
        for part, pname, shape, n in zip(
            flat.split([int(n) for n in numels]), names, shapes, numels, strict=True
        ):
            if _numel(shape) != int(n):
                bad_shapes.append(
                    f"{name}: {pname} has shape {tuple(shape)} but {n} elements in flatten_info"
                )
                continue
            put(f"{base}.{pname}", part.view(tuple(int(d) for d in shape)), source)
    unused_flat = [n for n in flatten_info if n not in used_flat]
    if unused:
        problems.append(f"shard_info lists parameters no rank holds a shard of: {_listing(unused)}")
    if unused_flat:
        problems.append(f"flatten_info lists flat parameters that no shard produced: {_listing(unused_flat)}")
    if unknown:
        problems.append(f"sharded keys without metadata: {_listing(unknown)}")
    if bad_shapes:
        problems.append("shape mismatches: " + "; ".join(bad_shapes[:_LIMIT]))
    if duplicates:
        problems.append(f"parameters produced more than once: {_listing(duplicates)}")
    if differing:
        problems.append(
            f"unsharded entries that differ between ranks (shards of different steps?): {_listing(differing)}"
        )
    if problems:
        raise TPUConsolidationError("cannot consolidate: " + "; ".join(problems))
    out: dict[str, torch.Tensor] = {}
    for name, value in full.items():
        clean = _clean(name)
        if clean in out:
            raise TPUConsolidationError(f"two entries become `{clean}` once the FSDP wrappers are removed")
        out[clean] = value
    return out


def consolidate_tpu(
    shards_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    pattern: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Merge the rank files of ``shards_dir`` into ``out`` (safetensors + the folder's config / tokenizer files).

    Args:
        shards_dir: a Cambrian-1 TPU output folder (``model_ckpt_rank-*-of-*.pth`` ...) or periodic checkpoint
            (``weights_rank-*-of-*-pytorch_model.bin``).
        out: destination; a Cambrian-1 HF-format folder that ``import-cambrian1`` reads.
        pattern: which set of rank files (``find_shard_sets`` names), when the folder holds several.
        max_shard_size: largest safetensors shard.
        overwrite: replace an existing ``out``.
    """
    folder = Path(shards_dir).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    pattern, files = _pick_set(folder, pattern)
    world = _check_ranks(pattern, files)
    files = sorted(files, key=lambda f: f.rank)
    loaded = [_load_rank(f) for f in files]
    metas = [m for _, m in loaded]
    sizes = {int(m.get("world_size", world)) for m in metas}
    if sizes != {world}:
        raise TPUConsolidationError(
            f"{pattern}: shard_metadata world sizes {sorted(sizes)} differ from the {world} files"
        )
    state = consolidate_state_dicts([s for s, _ in loaded], metas[0])
    del loaded
    shard_files = {f.path.name for group in find_shard_sets(folder).values() for f in group}
    with staged_folder(out, overwrite=overwrite) as tmp:
        for item in folder.iterdir():
            if item.is_file() and item.name not in shard_files:
                shutil.copy2(item, tmp / item.name)
        writer = ShardWriter(tmp, max_shard_size)
        writer.add_all(state.items())
        writer.finish()
        report = {"source": str(folder), "pattern": pattern, "world_size": world, "tensors": len(state)}
        (tmp / "consolidation.json").write_text(json.dumps(report, indent=2))
    return Path(out).expanduser().resolve()
