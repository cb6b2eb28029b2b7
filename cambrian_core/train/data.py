"""Training data: LLaVA-format JSONL read lazily through a byte-offset index.

The index is one pass over the file (offsets + a length estimate per line); ``__getitem__`` seeks to one line
and parses only it, so memory does not grow with the file and nothing is rescanned (reference §G.2).
Images are decoded and transformed per tower inside the DataLoader workers. A sample that cannot be used
(malformed line, missing or unreadable image, a conversation whose target mask cannot be computed, nothing
left to train after truncation) comes back as :class:`Skipped` with the reason: the collator drops it and the
trainer counts and logs it. It is never replaced by another sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from cambrian_core.data.medimage import to_rgb

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN_INDEX",
    "SKIP_REASONS",
    "JsonlIndex",
    "LazySupervisedDataset",
    "SkipReport",
    "Skipped",
    "image_paths",
    "skip_code",
    "tower_transform",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
_NO_IMAGE = {"", "none", "nan"}


class Skipped(NamedTuple):
    """A sample that was left out, and why (one short reason class + detail)."""

    index: int
    reason: str
    detail: str = ""


#: the reasons a sample is skipped for (``Skipped.reason`` starts with one of them)
SKIP_REASONS = (
    "malformed line",
    "missing image",
    "masking error",
    "bad conversation",
    "image count mismatch",
    "unreadable image",
    "no target tokens",
)


def skip_code(reason: str) -> int:
    """A small integer for a skip reason (1-based index in :data:`SKIP_REASONS`; one more for any other)."""
    for code, known in enumerate(SKIP_REASONS, 1):
        if reason.startswith(known):
            return code
    return len(SKIP_REASONS) + 1


class _Prepared(NamedTuple):
    """A sample that passed every check but is not loaded yet (image headers read, tokens truncated)."""

    paths: list[Path]
    images: list[Image.Image]
    sizes: list[tuple[int, int]]
    input_ids: torch.Tensor
    labels: torch.Tensor
    kept: int  #: images kept after truncation
    length: int  #: LLM sequence length, image tokens included


class SkipReport:
    """Counts skipped samples by reason (the trainer logs it; a few examples are kept for the log)."""

    def __init__(self, keep_examples: int = 3) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.keep = keep_examples

    def add(self, s: Skipped, where: Callable[[int], str] | None = None) -> None:
        """Count ``s``; ``where`` names a kept example's place (``index -> "file line N"``; default ``#index``)."""
        self.counts[s.reason] += 1
        ex = self.examples.setdefault(s.reason, [])
        if len(ex) < self.keep:
            place = where(s.index) if where is not None else f"#{s.index}"
            ex.append(f"{place}: {s.detail}" if s.detail else place)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """``"3 skipped: missing image x2 (#4: a.png, ...), malformed line x1 (...)"``."""
        return f"{self.total} skipped: {self.details()}" if self.total else "0 skipped"

    def details(self) -> str:
        """``"missing image x2 (#4: a.png, ...), malformed line x1 (...)"``, most frequent reason first."""
        return ", ".join(
            f"{r} x{n} ({'; '.join(self.examples.get(r, []))})" for r, n in self.counts.most_common()
        )


# --------------------------------------------------------------------------------------------------- index
def image_paths(record: dict[str, Any]) -> list[str]:
    """The record's image paths (LLaVA ``image``: a string or a list; ``""``/``None``/``"nan"`` = none)."""
    img = record.get("image")
    if img is None:
        return []
    items = img if isinstance(img, list) else [img]
    return [str(i) for i in items if str(i).strip().lower() not in _NO_IMAGE]


def _estimate_length(record: dict[str, Any]) -> tuple[int, int]:
    """Cheap token-count estimate (characters / 4) and the number of images of one record."""
    chars = sum(len(str(t.get("value", ""))) for t in record.get("conversations", []) if isinstance(t, dict))
    return chars // 4 + 1, len(image_paths(record))


class JsonlIndex:
    """Byte offsets, length estimates and image counts of every non-blank line of one or more JSONL files.

    Args:
        files: JSONL paths.
        cache_dir: where to keep the index between runs (keyed by path, size and mtime); ``None`` = no cache.
    """

    def __init__(
        self, files: Sequence[str | os.PathLike], cache_dir: str | os.PathLike | None = None
    ) -> None:
        self.files = [Path(f) for f in files]
        for f in self.files:
            if not f.is_file():
                raise FileNotFoundError(f"training data file not found: {f}")
        parts = [self._load_or_build(f, cache_dir) for f in self.files]
        self.file_ids = np.concatenate([np.full(len(p["offsets"]), i, np.int32) for i, p in enumerate(parts)])
        self.offsets = np.concatenate([p["offsets"] for p in parts])
        self.text_lengths = np.concatenate([p["lengths"] for p in parts])
        self.num_images = np.concatenate([p["images"] for p in parts])
        self.malformed = np.concatenate([p["malformed"] for p in parts])  #: lines that are not a JSON object

    def __len__(self) -> int:
        return len(self.offsets)

    @staticmethod
    def _scan(path: Path) -> dict[str, np.ndarray]:
        offsets, lengths, images, malformed = [], [], [], []
        pos = 0
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        rec = None
                    # a line that is not a JSON object is kept: reading it reports it as malformed, in its place
                    bad = not isinstance(rec, dict)
                    n, k = (1, 0) if bad else _estimate_length(rec)
                    offsets.append(pos)
                    lengths.append(n)
                    images.append(k)
                    malformed.append(bad)
                pos += len(line)
        return {
            "offsets": np.asarray(offsets, np.int64),
            "lengths": np.asarray(lengths, np.int64),
            "images": np.asarray(images, np.int32),
            "malformed": np.asarray(malformed, bool),
        }

    def _load_or_build(self, path: Path, cache_dir: str | os.PathLike | None) -> dict[str, np.ndarray]:
        if cache_dir is None:
            return self._scan(path)
        st = path.stat()
        key = hashlib.sha256(f"v2|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
        cached = Path(cache_dir) / f"{path.stem}-{key}.npz"
        if cached.is_file():
            with np.load(cached) as z:
                return {k: z[k] for k in ("offsets", "lengths", "images", "malformed")}
        arrays = self._scan(path)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cached)
        return arrays


# --------------------------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class _PreprocessSpec:
    """What ``VisionEncoder.preprocess`` reads from the tower, without the tower's weights (cheap to pickle)."""

    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    fill_color: tuple[int, int, int]


def tower_transform(tower: Any) -> Callable[[Image.Image], torch.Tensor]:
    """The tower's image transform as a picklable callable for DataLoader workers.

    Towers that keep the base ``VisionEncoder.preprocess`` get a weight-free copy of its settings; a tower that
    overrides ``preprocess`` is used as is.
    """
    from functools import partial

    from cambrian_core.model.encoder import VisionEncoder

    if type(tower).preprocess is VisionEncoder.preprocess:
        spec = _PreprocessSpec(
            int(tower.image_size), tuple(tower.image_mean), tuple(tower.image_std), tuple(tower.fill_color)
        )
        return partial(VisionEncoder.preprocess, spec)
    return tower.preprocess


# --------------------------------------------------------------------------------------------------- dataset
class LazySupervisedDataset(torch.utils.data.Dataset):
    """Tokenised, masked, truncated training samples with per-tower pixels (or cached tower features).

    Args:
        index: the :class:`JsonlIndex` of the files.
        tokenize: ``record -> (input_ids, labels, num_images)`` (the template's exact target masking; it raises
            on a conversation it cannot mask; that sample is then skipped).
        transforms: one image transform per tower (see :func:`tower_transform`); empty = text only.
        image_tokens: ``(width, height) -> tokens`` one image occupies in the LLM sequence (for truncation).
        max_length: LLM sequence budget (image tokens included); longer samples are cut before the first token
            that does not fit, never inside an image block (the images past the cut are dropped).
        image_folder: base of relative image paths; ``None`` = the folder of each JSONL file.
        feature_caches: one :class:`FeatureCache` per tower; when given, cached features replace pixels.
        subset: indices of ``index`` this dataset exposes (train / held-out split).
    """

    def __init__(
        self,
        index: JsonlIndex,
        tokenize: Callable[[dict[str, Any]], tuple[Sequence[int], Sequence[int], int]],
        transforms: Sequence[Callable[[Image.Image], torch.Tensor]] = (),
        image_tokens: Callable[[int, int], int] | int = 0,
        max_length: int = 2048,
        image_folder: str | os.PathLike | None = None,
        feature_caches: Sequence[Any] | None = None,
        subset: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        self.index = index
        self.tokenize = tokenize
        self.transforms = list(transforms)
        self.image_tokens = image_tokens
        self.max_length = max_length
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.feature_caches = list(feature_caches) if feature_caches else None
        self.subset = np.arange(len(index)) if subset is None else np.asarray(subset, dtype=np.int64)
        self._handles: dict[int, Any] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.subset)

    def nominal_image_tokens(self) -> int:
        """Tokens of a square image (used in length estimates)."""
        return self.image_tokens if isinstance(self.image_tokens, int) else int(self.image_tokens(1, 1))

    @property
    def lengths(self) -> np.ndarray:
        """Estimated LLM sequence length of each sample (for length grouping)."""
        i = self.subset
        return self.index.text_lengths[i] + self.index.num_images[i] * self.nominal_image_tokens()

    @property
    def has_image(self) -> np.ndarray:
        return self.index.num_images[self.subset] > 0

    def has_image_at(self, i: int) -> bool:
        """Whether sample ``i`` carries an image (one lookup; ``has_image`` builds the whole array)."""
        return bool(self.index.num_images[self.subset[i]] > 0)

    # -------------------------------------------------------------------------------------------- reading
    def read_record(self, i: int) -> dict[str, Any]:
        """The parsed JSON object of sample ``i`` (one seek + one line read)."""
        j = int(self.subset[i])
        if self._pid != os.getpid():  # fresh handles in each DataLoader worker
            self._handles, self._pid = {}, os.getpid()
        fid = int(self.index.file_ids[j])
        f = self._handles.get(fid)
        if f is None:
            f = self._handles[fid] = open(self.index.files[fid], "rb")  # noqa: SIM115 (kept open per worker)
        f.seek(int(self.index.offsets[j]))
        rec = json.loads(f.readline())
        if not isinstance(rec, dict):
            raise ValueError(f"a record must be a JSON object, got {type(rec).__name__}")
        return rec

    def resolve_image(self, i: int, rel: str) -> Path:
        base = self.image_folder or self.index.files[int(self.index.file_ids[int(self.subset[i])])].parent
        return base / rel

    def _n_image_tokens(self, size: tuple[int, int]) -> int:
        return self.image_tokens if isinstance(self.image_tokens, int) else int(self.image_tokens(*size))

    def where(self, i: int) -> str:
        """``records.jsonl line 17``: the file and 1-based line of sample ``i`` (reads the file up to it)."""
        j = int(self.subset[i])
        path = self.index.files[int(self.index.file_ids[j])]
        remaining, newlines = int(self.index.offsets[j]), 0
        with open(path, "rb") as f:
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                newlines += chunk.count(b"\n")
                remaining -= len(chunk)
        return f"{path} line {newlines + 1}"

    def check(self, i: int, decode: bool = False) -> Skipped | None:
        """Why sample ``i`` would be skipped, or ``None``: every check of ``__getitem__`` that needs no pixel data
        (the record, its images' existence and headers, the target mask, truncation); with ``decode`` also the
        images' pixel data, where training decodes it (not when features come from a cache)."""
        got = self._prepare(i)
        if isinstance(got, Skipped):
            return got
        if decode and self.feature_caches is None and self.transforms:
            try:
                for im in got.images[: got.kept]:
                    im.load()
            except Exception as exc:  # truncated or corrupt pixel data, as __getitem__ would meet it
                return Skipped(i, "unreadable image", f"{exc}"[:160])
        return None

    def _prepare(self, i: int) -> _Prepared | Skipped:
        try:
            rec = self.read_record(i)
        except (ValueError, UnicodeDecodeError) as exc:
            return Skipped(i, "malformed line", str(exc)[:120])
        paths = [self.resolve_image(i, p) for p in image_paths(rec)]
        for p in paths:
            if not p.is_file():
                return Skipped(i, "missing image", str(p))
        try:
            ids, labels, n_img = self.tokenize(rec)
        except (
            Exception
        ) as exc:  # the template's MaskingError, or a record the converter never should have written
            return Skipped(
                i, "masking error" if "Mask" in type(exc).__name__ else "bad conversation", str(exc)[:160]
            )
        if n_img != len(paths):
            return Skipped(
                i, "image count mismatch", f"{len(paths)} image file(s), {n_img} <image> marker(s)"
            )
        try:
            images = [Image.open(p) for p in paths]  # reads the header only
        except Exception as exc:  # PIL raises many types for damaged files
            return Skipped(i, "unreadable image", f"{exc}"[:160])
        sizes = [im.size for im in images]
        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        labels_t = torch.as_tensor(list(labels), dtype=torch.long)
        ids_t, labels_t, kept, length = self._truncate(ids_t, labels_t, sizes)
        if not bool((labels_t[1:] != IGNORE_INDEX).any()):
            why = (
                "no target tokens"
                if len(ids_t) == len(ids)
                else f"no target tokens within max_length={self.max_length}"
            )
            return Skipped(i, why)
        return _Prepared(paths, images, sizes, ids_t, labels_t, kept, length)

    def __getitem__(self, i: int) -> dict[str, Any] | Skipped:
        got = self._prepare(i)
        if isinstance(got, Skipped):
            return got
        paths, images, sizes, ids_t, labels_t, kept, length = got
        sample: dict[str, Any] = {
            "index": i,
            "input_ids": ids_t,
            "labels": labels_t,
            "image_sizes": torch.tensor(sizes[:kept], dtype=torch.long).reshape(-1, 2),
            "length": length,
        }
        if self.feature_caches is not None:
            from cambrian_core.train.feature_cache import content_hash

            hashes = [content_hash(p) for p in paths[:kept]]
            for p, h in zip(paths, hashes, strict=False):
                if not all(c.has(h) for c in self.feature_caches):  # the cache build could not decode it
                    return Skipped(
                        i, "unreadable image", f"{p}: not in the feature cache (it did not decode)"
                    )
            sample["tower_features"] = [c.batch(hashes) if hashes else None for c in self.feature_caches]
        elif self.transforms:
            try:
                rgb = [to_rgb(im) for im in images[:kept]]  # 16-bit greyscale rescaled, not clipped
            except Exception as exc:  # truncated or corrupt pixel data
                return Skipped(i, "unreadable image", f"{exc}"[:160])
            sample["pixel_values"] = [
                torch.stack([t(im) for im in rgb]) if rgb else None for t in self.transforms
            ]
        return sample

    def _truncate(
        self, ids: torch.Tensor, labels: torch.Tensor, sizes: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Cut at the first token that does not fit; an image block is kept whole or dropped with all after it."""
        weights = torch.ones(len(ids), dtype=torch.long)
        img_pos = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
        for k, pos in enumerate(img_pos.tolist()):
            weights[pos] = self._n_image_tokens(sizes[k])
        total = torch.cumsum(weights, 0)
        length = int(total[-1]) if len(total) else 0
        if length <= self.max_length:
            return ids, labels, len(img_pos), length
        cut = int((total > self.max_length).nonzero()[0])
        kept = int((img_pos < cut).sum())
        return ids[:cut], labels[:cut], kept, int(total[cut - 1]) if cut else 0
