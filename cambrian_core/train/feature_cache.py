"""Frozen-tower feature cache: tower outputs computed once, stored as bf16 safetensors shards, reused.

One folder per tower and weights: ``<root>/<TowerClass>-<tower.cache_key()>/`` holding ``shard_*.safetensors``
(one tensor ``[token_len, hidden]`` per image, named by the image's content hash) and ``meta.json`` (the tower's
config, the shards with their sizes, ``complete``). Because the folder name carries the weights digest, changed
tower weights never read old features: the old folder is reported as stale and a new one is built. A shard that
is missing, truncated or unlisted (a build that was killed) is detected and its images are rebuilt.

For a connector that takes :class:`~cambrian_core.model.encoder.StagedTokens` (SVA) and a multi-stage tower, the
cache stores the tower's stages instead (``<TowerClass>-<key>-staged/``, tensors ``<hash>.<k>`` ``[C_k, h_k, w_k]``):
what the live tower hands the connector, and smaller (ConvNeXt-XXL at 1024 px into 96x96 tokens: 20 M instead of
53 M values per image).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cambrian_core.model.encoder import StagedTokens

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


def staged_layout(tower: Any) -> tuple[tuple[int, int, int], ...] | None:
    """``(C_k, h_k, w_k)`` of the stages ``tower.forward_staged`` returns (one blank image through the tower),
    or ``None`` when it returns plain tokens or all its stages are on the output grid (then the tokens are the
    same numbers, and the token cache serves every connector)."""
    param = next(tower.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad():
        out = tower.forward_staged(torch.zeros(1, 3, tower.image_size, tower.image_size, device=device))
    if not isinstance(out, StagedTokens) or all((h, w) == (out.side, out.side) for _, h, w in out.layout):
        return None
    return out.layout


class FeatureCache:
    """The cache of one tower (see module docstring).

    Args:
        root: folder shared by runs (``data.feature_cache``); each tower gets a sub-folder.
        tower: the frozen ``VisionEncoder`` whose outputs are cached.
        shard_bytes: target shard size.
        staged: store the tower's ``forward_staged`` stages when it has several (for connectors that accept
            ``StagedTokens``); a tower without stages is cached as tokens either way.
    """

    def __init__(
        self, root: str | os.PathLike, tower: Any, shard_bytes: int = 512 << 20, staged: bool = False
    ) -> None:
        self.root = Path(root)
        self.tower_class = type(tower).__name__
        self.key = tower.cache_key()
        self.token_len = int(tower.token_len)
        self.hidden_size = int(tower.hidden_size)
        self.tower_config = tower.config_dict()
        #: per-image ``(C_k, h_k, w_k)`` of the stored stages, ``None`` for token tensors
        self.stages = staged_layout(tower) if staged else None
        suffix = "-staged" if self.stages is not None else ""
        self.folder = self.root / f"{self.tower_class}-{self.key}{suffix}"
        self.shard_bytes = shard_bytes
        self._index: dict[str, str] | None = None
        self._handles: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ bookkeeping
    @property
    def bytes_per_image(self) -> int:
        if self.stages is not None:
            return sum(c * h * w for c, h, w in self.stages) * 2  # bf16
        return self.token_len * self.hidden_size * 2  # bf16

    def describe(self) -> str:
        """What one image's entry holds, e.g. ``[576, 1024]`` or ``stages [[1152, 96, 96], [1536, 64, 64], ...]``."""
        if self.stages is not None:
            return "stages " + str([list(s) for s in self.stages])
        return f"[{self.token_len}, {self.hidden_size}]"

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
            "stages": None if self.stages is None else [list(s) for s in self.stages],
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
        stages = None if self.stages is None else [list(s) for s in self.stages]
        if meta.get("stages") != stages:
            raise StaleCacheError(
                f"feature cache {self.folder} holds stages {meta.get('stages')}, the tower gives {stages}; "
                f"delete the folder"
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
                        idx[k.split(".", 1)[0]] = name  # staged entries are <hash>.<stage>
            self._index = idx
        return self._index

    def stale_folders(self) -> list[Path]:
        """Other cache folders of the same tower class (older weights): never read, safe to delete."""
        if not self.root.is_dir():
            return []
        mine = {f"{self.tower_class}-{self.key}", f"{self.tower_class}-{self.key}-staged"}  # both layouts
        return sorted(p for p in self.root.glob(f"{self.tower_class}-*") if p.is_dir() and p.name not in mine)

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
        encode: Callable[[list[Any]], torch.Tensor | StagedTokens],
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Compute and store the features of ``items`` (``{content hash: anything encode accepts}``).

        ``encode(list_of_items) -> [n, token_len, hidden]`` runs the tower (``StagedTokens`` of the probed
        layout for a staged cache). Shards are written to a temporary
        name, fsynced and renamed, and the meta is rewritten after each shard, so a killed build keeps every
        finished shard. An image that does not decode is left out (``self.unreadable``: hash -> why; training
        skips its samples). Returns the number of images written.
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

        self.unreadable: dict[str, str] = {}
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            encoded = self._encode_chunk(chunk, items, encode)
            for k, entry in encoded:
                for suffix, t in entry:
                    # a copy of its own: safetensors refuses tensors that share storage (slices of one batch)
                    pending[k + suffix] = t.to(device="cpu", dtype=_DTYPE, copy=True).contiguous()
                if len(pending) >= per_shard * len(entry):
                    flush()
            written += len(encoded)
            if progress:
                progress(len(chunk))
        if pending:
            flush()
        self._write_meta(good, complete=True)
        self._index = None
        return written

    def _encode_chunk(
        self, chunk: list[str], items: Mapping[str, Any], encode: Callable[[list[Any]], Any]
    ) -> list[tuple[str, list[tuple[str, torch.Tensor]]]]:
        """``(hash, entries)`` of a chunk of images. When the batch fails (an image that does not decode), the
        images are encoded one by one and those that fail are left out, in ``self.unreadable`` (hash -> why)."""
        try:
            feats = encode([items[k] for k in chunk])
        except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises for damaged image files
            if len(chunk) == 1:
                self.unreadable[chunk[0]] = f"{items[chunk[0]]}: {exc}"[:200]
                return []
            return [pair for k in chunk for pair in self._encode_chunk([k], items, encode)]
        return list(zip(chunk, self._entries(feats, len(chunk)), strict=True))

    def _entries(self, feats: torch.Tensor | StagedTokens, n: int) -> list[list[tuple[str, torch.Tensor]]]:
        """Per image, the (name suffix, tensor) pairs to store; the tower's output checked against the cache."""
        if self.stages is None:
            expected = (n, self.token_len, self.hidden_size)
            if not isinstance(feats, torch.Tensor) or tuple(feats.shape) != expected:
                got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
                raise ValueError(f"tower gave features {got}, the cache expects {expected}")
            return [[("", f)] for f in feats]
        if not isinstance(feats, StagedTokens) or feats.layout != self.stages or feats.parts[0].shape[0] != n:
            got = (
                (feats.parts[0].shape[0], feats.layout)
                if isinstance(feats, StagedTokens)
                else tuple(feats.shape)
            )
            raise ValueError(
                f"tower gave features {got}, the cache expects {n} images of stages {self.stages}"
            )
        return [[(f".{k}", p[i]) for k, p in enumerate(feats.parts)] for i in range(n)]

    def has(self, h: str) -> bool:
        """Whether the image with content hash ``h`` is cached."""
        return h in self.index()

    def get(self, h: str) -> torch.Tensor | StagedTokens:
        """The cached bf16 features of the image with content hash ``h``: ``[token_len, hidden]``, or for a staged
        cache ``StagedTokens`` of one image."""
        shard = self.index().get(h)
        if shard is None:
            raise KeyError(f"image {h} is not in feature cache {self.folder}; rebuild the cache")
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(self.folder / shard, framework="pt")
        if self.stages is None:
            return handle.get_tensor(h)
        parts = tuple(handle.get_tensor(f"{h}.{k}").unsqueeze(0) for k in range(len(self.stages)))
        return StagedTokens(parts, math.isqrt(self.token_len))

    def batch(self, hashes: list[str]) -> torch.Tensor | StagedTokens:
        """The features of several images, batched: ``[n, token_len, hidden]`` or ``StagedTokens``."""
        got = [self.get(h) for h in hashes]
        if self.stages is None:
            return torch.stack(got)  # type: ignore[arg-type]
        return StagedTokens.cat(got)  # type: ignore[arg-type]

    def __getstate__(self) -> dict[str, Any]:  # open shard handles do not cross into DataLoader workers
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
