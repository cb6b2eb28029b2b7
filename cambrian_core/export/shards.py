"""Sharded safetensors in the Hugging Face layout: ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``.

:class:`ShardWriter` streams tensors into shards of at most ``max_shard_size`` bytes (a tensor larger than
that gets a shard of its own), so a converter never needs the whole model in memory. :func:`read_state`
reads a Hugging Face weights folder (safetensors, sharded or not; or ``pytorch_model*.bin`` through
``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = [
    "INDEX_NAME",
    "ShardWriter",
    "iter_state",
    "parse_size",
    "read_state",
    "split_aliases",
    "torch_load",
    "weight_files",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_BIN_INDEX = "pytorch_model.bin.index.json"
_BIN_SINGLE = "pytorch_model.bin"


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(size: int | str) -> int:
    """``"2GB"`` / ``"500MB"`` (decimal) / ``"10KiB"`` / ``"1.5GiB"`` (binary) / bytes (``1000000`` or
    ``"1000000"``) -> bytes."""
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
        unit = match.group(2).upper() if match else None
        if unit not in _UNITS:
            raise ValueError(
                f"max shard size {size!r} is not a size like '2GB', '500MB', '512MiB' or a byte count"
            )
        size = int(Decimal(match.group(1)) * _UNITS[unit])
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(
            f"max shard size {size!r} is not a size like '2GB', '500MB', '512MiB' or a byte count"
        )
    if size <= 0:
        raise ValueError(f"max shard size must be > 0 bytes, got {size}")
    return size


def split_aliases(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors without tied duplicates (same storage, offset, shape, stride, dtype) and ``{alias: source}``."""
    seen: dict[tuple[Any, ...], str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t
    return out, aliases


class ShardWriter:
    """Write tensors into numbered safetensors shards of at most ``max_shard_size`` bytes.

    Args:
        folder: where the shards go (must exist).
        max_shard_size: shard budget (``"5GB"``, bytes ...).
        always_index: write the index even for one shard (cambrian's own layout); otherwise a single shard is
            named ``model.safetensors`` with no index (the Hugging Face convention).
    """

    def __init__(
        self, folder: str | os.PathLike[str], max_shard_size: int | str = "5GB", always_index: bool = False
    ):
        self.folder = Path(folder)
        self.limit = parse_size(max_shard_size)
        self.always_index = always_index
        self._current: dict[str, torch.Tensor] = {}
        self._current_bytes = 0
        self._files: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (written when its shard is full or at :meth:`finish`)."""
        if name in self._names:
            raise ValueError(f"tensor `{name}` was written twice")
        self._names.add(name)
        t = tensor.detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        if self._current and self._current_bytes + size > self.limit:
            self._flush()
        if any(
            t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr() for o in self._current.values()
        ):
            t = t.clone()  # safetensors refuses tensors sharing memory within a file
        self._current[name] = t
        self._current_bytes += size
        self.total_size += size

    def add_all(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """:meth:`add` for each ``(name, tensor)``."""
        for name, t in tensors:
            self.add(name, t)

    def _flush(self) -> None:
        if not self._current:
            return
        path = self.folder / f".shard-{len(self._files):05d}.tmp"
        save_file(self._current, str(path), metadata={"format": "pt"})
        self._files.append((path, list(self._current)))
        self._current, self._current_bytes = {}, 0

    def finish(
        self, aliases: Mapping[str, str] | None = None, metadata: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Write the last shard, name the shards, write the index; returns the index (``None`` if not written).

        Args:
            aliases: ``{tied name: stored name}`` kept in the index (cambrian's layout restores them).
            metadata: extra index ``metadata`` entries.
        """
        self._flush()
        n = len(self._files)
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self._files, start=1):
            final = (
                SINGLE_NAME if n == 1 and not self.always_index else f"model-{i:05d}-of-{n:05d}.safetensors"
            )
            os.replace(tmp, self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        if n == 1 and not self.always_index and not aliases:
            return None
        index: dict[str, Any] = {
            "metadata": {"total_size": self.total_size, **dict(metadata or {})},
            "weight_map": weight_map,
        }
        if aliases:
            index["aliases"] = dict(aliases)
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        return index


def weight_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The weight files of a Hugging Face style folder, in index order (safetensors preferred over .bin)."""
    folder = Path(folder)
    for index_name in (INDEX_NAME, _BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder}: shards {missing} listed in {index_name} are missing")
            return [folder / n for n in names]
    for single in (SINGLE_NAME, _BIN_SINGLE):
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(
        f"{folder} holds no weights: expected {SINGLE_NAME}, {INDEX_NAME}, {_BIN_SINGLE} or {_BIN_INDEX}"
    )


def torch_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, memory-mapped when the file is in the zip format; a file
    torch cannot read is a :class:`ModelFileError` naming it."""
    from cambrian_core.model.io import ModelFileError

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as exc:
        raise ModelFileError(
            f"{path} cannot be read by torch.load ({str(exc).splitlines()[0]}); it is truncated or corrupt: "
            "copy it again"
        ) from None


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from cambrian_core.model.io import read_safetensors

        return read_safetensors(path)
    state = torch_load(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")
    return dict(state)


def iter_state(folder: str | os.PathLike[str]) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """``(file, tensors)`` for each weight file of ``folder``, one file in memory at a time."""
    for path in weight_files(folder):
        yield path, _load_file(path)


def read_state(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face style weights folder (plus cambrian index ``aliases``)."""
    state: dict[str, torch.Tensor] = {}
    for _, part in iter_state(folder):
        state.update(part)
    index = Path(folder) / INDEX_NAME
    if index.is_file():
        for alias, source in json.loads(index.read_text()).get("aliases", {}).items():
            state[alias] = state[source]
    return state
