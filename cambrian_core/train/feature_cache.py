"""Frozen-tower feature cache: tower outputs computed once, stored as bf16 safetensors shards, reused.

One folder per tower and weights: ``<root>/<TowerClass>-<tower.cache_key()>/`` holding ``shard_*.safetensors``
(one tensor ``[token_len, hidden]`` per image, named by the image's content hash) and ``meta.json`` (the tower's
config, the shards with their sizes, ``complete``). Because the folder name carries the weights digest, changed
tower weights never read old features: the old folder is reported as stale and a new one is built. A shard that
is missing, truncated or unlisted (a build that was killed) is detected and its images are rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["CacheStatus", "FeatureCache", "StaleCacheError", "content_hash", "human_bytes"]

log = logging.getLogger(__name__)
FORMAT = 1
_DTYPE = torch.bfloat16


class StaleCacheError(RuntimeError):
    """A cache folder does not belong to the tower it is used with."""


def content_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 (first 32 digits) of a file's bytes: the cache key of an image, whatever its name."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:32]


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class CacheStatus:
    """What a cache folder holds for a set of images."""

    folder: Path
    missing: list[str]  #: content hashes not (or no longer) cached
    cached: int  #: hashes found
    stale: list[Path] = field(default_factory=list)  #: folders of the same tower class with other weights
    bad_shards: list[str] = field(default_factory=list)  #: listed shards that are missing or truncated

    @property
    def complete(self) -> bool:
        return not self.missing


class FeatureCache:
    """The cache of one tower (see module docstring).

    Args:
        root: folder shared by runs (``data.feature_cache``); each tower gets a sub-folder.
        tower: the frozen ``VisionEncoder`` whose outputs are cached.
        shard_bytes: target shard size.
    """

    def __init__(self, root: str | os.PathLike, tower: Any, shard_bytes: int = 512 << 20) -> None:
        self.root = Path(root)
        self.tower_class = type(tower).__name__
        self.key = tower.cache_key()
        self.token_len = int(tower.token_len)
        self.hidden_size = int(tower.hidden_size)
        self.tower_config = tower.config_dict()
        self.folder = self.root / f"{self.tower_class}-{self.key}"
        self.shard_bytes = shard_bytes
        self._index: dict[str, str] | None = None
        self._handles: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ bookkeeping
    @property
    def bytes_per_image(self) -> int:
        return self.token_len * self.hidden_size * 2  # bf16

    def estimate_bytes(self, n_images: int) -> int:
        """Disk size of ``n_images`` cached feature maps (bf16, shard headers not counted)."""
        return n_images * self.bytes_per_image

    def _meta_path(self) -> Path:
        return self.folder / "meta.json"

    def _read_meta(self) -> dict[str, Any] | None:
        try:
            return json.loads(self._meta_path().read_text())
        except (OSError, ValueError):
            return None

    def _write_meta(self, shards: Mapping[str, int], complete: bool) -> None:
        meta = {
            "format": FORMAT,
            "cache_key": self.key,
            "tower_class": self.tower_class,
            "tower": self.tower_config,
            "token_len": self.token_len,
            "hidden_size": self.hidden_size,
            "dtype": "bfloat16",
            "shards": dict(shards),
            "complete": complete,
        }
        tmp = self._meta_path().with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=1, default=str))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self._meta_path())

    def _valid_shards(self) -> tuple[dict[str, int], list[str]]:
        """Shards listed in the meta whose file exists with the recorded size (plus the bad ones' names)."""
        meta = self._read_meta()
        if meta is None:
            return {}, []
        if meta.get("cache_key") != self.key:
            raise StaleCacheError(
                f"feature cache {self.folder} was built for tower weights {meta.get('cache_key')}, not {self.key}; "
                f"delete the folder"
            )
        if (meta.get("token_len"), meta.get("hidden_size")) != (self.token_len, self.hidden_size):
            raise StaleCacheError(
                f"feature cache {self.folder} holds [{meta.get('token_len')}, {meta.get('hidden_size')}] features, "
                f"the tower gives [{self.token_len}, {self.hidden_size}]; delete the folder"
            )
        good, bad = {}, []
        for name, size in meta.get("shards", {}).items():
            p = self.folder / name
            if p.is_file() and p.stat().st_size == size:
                good[name] = size
            else:
                bad.append(name)
        return good, bad

    def index(self) -> dict[str, str]:
        """``{content hash: shard file}`` of every valid shard (read from the shard headers once)."""
        if self._index is None:
            good, _ = self._valid_shards()
            idx: dict[str, str] = {}
            for name in good:
                with safe_open(self.folder / name, framework="pt") as f:
                    for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        idx[k] = name
            self._index = idx
        return self._index

    def stale_folders(self) -> list[Path]:
        """Other cache folders of the same tower class (older weights): never read, safe to delete."""
        if not self.root.is_dir():
            return []
        return sorted(
            p for p in self.root.glob(f"{self.tower_class}-*") if p.is_dir() and p.name != self.folder.name
        )

    def status(self, hashes: Iterable[str]) -> CacheStatus:
        """Which of ``hashes`` are cached, which are missing, and what looks stale or broken."""
        self._index = None
        _, bad = self._valid_shards()
        idx = self.index()
        wanted = list(dict.fromkeys(hashes))
        missing = [h for h in wanted if h not in idx]
        return CacheStatus(self.folder, missing, len(wanted) - len(missing), self.stale_folders(), bad)

    # ------------------------------------------------------------------------------------------ build / read
    @torch.no_grad()
    def build(
        self,
        items: Mapping[str, Any],
        encode: Callable[[list[Any]], torch.Tensor],
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Compute and store the features of ``items`` (``{content hash: anything encode accepts}``).

        ``encode(list_of_items) -> [n, token_len, hidden]`` runs the tower. Shards are written to a temporary
        name, fsynced and renamed, and the meta is rewritten after each shard, so a killed build keeps every
        finished shard. Returns the number of images written.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        good, _ = self._valid_shards()
        for p in self.folder.glob("*.tmp"):
            p.unlink()
        for p in self.folder.glob("shard_*.safetensors"):  # a shard renamed but never listed: unknown state
            if p.name not in good:
                p.unlink()
        next_id = 1 + max((int(n[6:11]) for n in good), default=-1)
        per_shard = max(1, self.shard_bytes // self.bytes_per_image)
        keys = list(items)
        pending: dict[str, torch.Tensor] = {}
        written = 0

        def flush() -> None:
            nonlocal next_id
            name = f"shard_{next_id:05d}.safetensors"
            tmp = self.folder / (name + ".tmp")
            save_file(pending, str(tmp), metadata={"cache_key": self.key})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / name)
            good[name] = (self.folder / name).stat().st_size
            self._write_meta(good, complete=False)
            next_id += 1
            pending.clear()

        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            feats = encode([items[k] for k in chunk])
            expected = (len(chunk), self.token_len, self.hidden_size)
            if tuple(feats.shape) != expected:
                raise ValueError(f"tower gave features {tuple(feats.shape)}, the cache expects {expected}")
            for k, f in zip(chunk, feats, strict=True):
                pending[k] = f.to(_DTYPE).cpu().contiguous()
                if len(pending) >= per_shard:
                    flush()
            written += len(chunk)
            if progress:
                progress(len(chunk))
        if pending:
            flush()
        self._write_meta(good, complete=True)
        self._index = None
        return written

    def get(self, h: str) -> torch.Tensor:
        """The cached ``[token_len, hidden]`` bf16 features of the image with content hash ``h``."""
        shard = self.index().get(h)
        if shard is None:
            raise KeyError(f"image {h} is not in feature cache {self.folder}; rebuild the cache")
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(self.folder / shard, framework="pt")
        return handle.get_tensor(h)

    def __getstate__(self) -> dict[str, Any]:  # open shard handles do not cross into DataLoader workers
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
