"""Quality filters for LLaVA records: conversation validity, caption length, image checks, medical domain, dedup.

Every dropped record goes to a rejects file with the rule and the reason, so a filter run can be audited and a
threshold tuned without guessing. Rules run cheapest first; duplicates are judged among records that passed every
other rule. Records of the same case (same ``provenance.source`` + ``source_id``, or + ``group`` where the
converter groups cases, as Quilt does for the rows of one frame) share images by design (a caption record and an
instruction record of one figure) and are never duplicates of each other.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from cambrian_core.data.classify import load_callable, medical_domain
from cambrian_core.data.perceptual_hash import NearDuplicateIndex, hamming, phash
from cambrian_core.data.records import (
    IMAGE_TOKEN,
    conversation_problem,
    iter_records,
    rebase_images,
    record_images,
)

__all__ = [
    "DEFAULT_DOMAIN_SOURCES",
    "FilterStats",
    "ImageInfo",
    "RecordFilter",
    "filter_files",
    "record_text",
]

#: sources whose records get the medical-domain check by default: mixed-content figure sets and imports (records
#: without provenance count as source "")
DEFAULT_DOMAIN_SOURCES = frozenset({"pmc_oa", "llava", ""})

DomainCheck = Callable[[dict[str, Any]], tuple[bool, str]]


def record_text(record: dict[str, Any]) -> str:
    """All conversation text of ``record`` without image tokens."""
    conv = record.get("conversations") or []
    return "\n".join(str(t.get("value", "")).replace(IMAGE_TOKEN, "") for t in conv if isinstance(t, dict))


def default_domain_check(record: dict[str, Any]) -> tuple[bool, str]:
    """Keyword/modality heuristic over the record's text (:func:`cambrian_core.data.classify.medical_domain`)."""
    return medical_domain(record_text(record))


@dataclass
class ImageInfo:
    """What the filter learned about one image file (computed once per path)."""

    problem: str | None = None
    sha256: str = ""
    phash: int = 0
    size: tuple[int, int] = (0, 0)


@dataclass
class FilterStats:
    """Counts of one filter run."""

    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}


class RecordFilter:
    """Decides, record by record, whether to keep it; stateful for de-duplication.

    Args:
        min_caption_words / max_caption_words: bounds on the answer length of ``stage == "caption"`` records.
        check_images: open and fully decode each image; drop missing, corrupt, too small or blank ones.
        min_image_size: smallest allowed width and height in pixels.
        blank_std: a grey image whose pixel standard deviation (0-255 scale) is below this is blank.
        dedup: ``"phash"`` (exact + perceptual), ``"exact"`` (sha256 of the image bytes) or ``"none"``.
        phash_distance: largest Hamming distance (of 64 bits) counted as a near duplicate.
        dedup_scope: ``"stage"`` (a caption and an instruction record may share an image) or ``"all"``.
        domain: medical-domain check ``record -> (keep, reason)``, a ``"module:function"`` string, or ``None``.
        domain_sources: provenance sources the domain check applies to (``None``: every record).
    """

    def __init__(
        self,
        min_caption_words: int = 5,
        max_caption_words: int | None = None,
        check_images: bool = True,
        min_image_size: int = 32,
        blank_std: float = 2.0,
        dedup: str = "phash",
        phash_distance: int = 4,
        dedup_scope: str = "stage",
        domain: DomainCheck | str | None = default_domain_check,
        domain_sources: Iterable[str] | None = DEFAULT_DOMAIN_SOURCES,
    ) -> None:
        if dedup not in ("phash", "exact", "none"):
            raise ValueError(f"dedup must be 'phash', 'exact' or 'none', got {dedup!r}")
        if dedup_scope not in ("stage", "all"):
            raise ValueError(f"dedup_scope must be 'stage' or 'all', got {dedup_scope!r}")
        for name, value in (
            ("min_caption_words", min_caption_words),
            ("min_image_size", min_image_size),
            ("blank_std", blank_std),
            ("phash_distance", phash_distance),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if max_caption_words is not None and max_caption_words < min_caption_words:
            raise ValueError(
                f"max_caption_words {max_caption_words} is below min_caption_words {min_caption_words}"
            )
        self.min_caption_words = min_caption_words
        self.max_caption_words = max_caption_words
        self.check_images = check_images
        self.min_image_size = min_image_size
        self.blank_std = blank_std
        self.dedup = dedup
        self.phash_distance = phash_distance
        self.dedup_scope = dedup_scope
        self.domain: DomainCheck | None = load_callable(domain) if domain is not None else None
        self.domain_sources = None if domain_sources is None else frozenset(domain_sources)
        self._images: dict[Path, ImageInfo] = {}
        self._exact: dict[tuple[str, tuple[str, ...]], tuple[tuple[str, str], str]] = {}
        self._identical: dict[tuple[str, str, str, tuple[str, ...]], str] = {}
        self._near: dict[str, NearDuplicateIndex] = {}

    # -- images ---------------------------------------------------------------------------------------------
    def image_info(self, path: Path) -> ImageInfo:
        """Decode ``path`` once and remember the verdict and hashes."""
        if path in self._images:
            return self._images[path]
        info = ImageInfo()
        try:
            data = path.read_bytes()
            with Image.open(path) as im:
                im.load()
                info.size = im.size
                grey = im.convert("L")
                info.phash = phash(im)
            info.sha256 = hashlib.sha256(data).hexdigest()
            w, h = info.size
            if min(w, h) < self.min_image_size:
                info.problem = f"image {path.name} is {w}x{h} px (< min_image_size={self.min_image_size})"
            elif float(np.asarray(grey, dtype=np.float32).std()) < self.blank_std:
                info.problem = f"image {path.name} is blank (pixel std < {self.blank_std})"
        except FileNotFoundError:
            info.problem = f"image file {path} does not exist"
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            info.problem = f"image {path} cannot be decoded ({type(exc).__name__}: {exc})"
        self._images[path] = info
        return info

    # -- rules ------------------------------------------------------------------------------------------------
    def _caption_problem(self, record: dict[str, Any]) -> str | None:
        if record.get("stage") != "caption":
            return None
        words = len(record["conversations"][1]["value"].split())
        if words < self.min_caption_words:
            return f"caption has {words} words (< min_caption_words={self.min_caption_words})"
        if self.max_caption_words is not None and words > self.max_caption_words:
            return f"caption has {words} words (> max_caption_words={self.max_caption_words})"
        return None

    def _domain_problem(self, record: dict[str, Any]) -> str | None:
        if self.domain is None:
            return None
        source = str((record.get("provenance") or {}).get("source") or "")
        if self.domain_sources is not None and source not in self.domain_sources:
            return None
        keep, reason = self.domain(record)
        return None if keep else f"not medical: {reason}"

    def _duplicate(self, record: dict[str, Any], infos: list[ImageInfo]) -> str | None:
        if self.dedup == "none":
            return None
        prov = record.get("provenance") or {}
        group = prov.get("group") or prov.get("source_id", record.get("id", ""))
        case = (str(prov.get("source", "")), str(group))
        scope = str(record.get("stage", "")) if self.dedup_scope == "stage" else ""
        rid = str(record.get("id", ""))
        text = json.dumps([t.get("value") for t in record["conversations"]], ensure_ascii=False)
        text_digest = hashlib.sha256(text.encode()).hexdigest()
        digest = tuple(i.sha256 for i in infos) if infos else (text_digest,)
        # the same record twice (copied, or a file passed twice) is a duplicate whatever its case; the case
        # exemption below is for different records of one case (its caption and its instruction records)
        same = (scope, rid, text_digest, tuple(i.sha256 for i in infos))
        if same in self._identical:
            return f"identical to record {self._identical[same]}"
        self._identical[same] = rid
        seen = self._exact.get((scope, digest))
        if seen is not None and seen[0] != case:
            return f"exact duplicate of {seen[1]}"
        if self.dedup == "phash" and infos:
            index = self._near.setdefault(scope, NearDuplicateIndex(self.phash_distance))
            hashes = tuple(i.phash for i in infos)
            for (other_case, other_id, other_hashes), _ in index.find_all(hashes[0]):
                if other_case == case or len(other_hashes) != len(hashes):
                    continue
                dists = [hamming(a, b) for a, b in zip(hashes, other_hashes, strict=True)]
                if max(dists) <= self.phash_distance:
                    return (
                        f"near duplicate of {other_id} (pHash distance {max(dists)} <= {self.phash_distance})"
                    )
            index.add(hashes[0], (case, rid, hashes))
        self._exact.setdefault((scope, digest), (case, rid))
        return None

    def check(self, record: dict[str, Any], root: Path) -> tuple[str, str] | None:
        """``(rule, reason)`` when ``record`` (images relative to ``root``) is dropped, else ``None`` (kept)."""
        problem = conversation_problem(record)
        if problem:
            return "conversation", problem
        problem = self._caption_problem(record)
        if problem:
            return "caption_length", problem
        infos = []
        if self.check_images or self.dedup != "none":
            for p in record_images(record):
                info = self.image_info((root / p) if not Path(p).is_absolute() else Path(p))
                if info.problem:
                    return "image", info.problem
                infos.append(info)
        problem = self._domain_problem(record)
        if problem:
            return "domain", problem
        problem = self._duplicate(record, infos)
        if problem:
            return "duplicate", problem
        return None


def filter_files(
    inputs: list[str | Path],
    out: str | Path,
    rejects: str | Path | None = None,
    record_filter: RecordFilter | None = None,
) -> FilterStats:
    """Filter every record of ``inputs`` (JSONL or JSON arrays, in order) into ``out`` (JSONL).

    Image paths are rewritten relative to ``out``'s folder. Dropped records go to ``rejects`` (default
    ``<out stem>.rejects.jsonl``) as ``{"id", "source", "rule", "reason", "file", "line", "record"}``.
    """
    out = Path(out)
    rejects = Path(rejects) if rejects else out.with_name(out.stem + ".rejects.jsonl")
    sources = [Path(p) for p in inputs]
    for src in sources:
        if not src.is_file():
            raise FileNotFoundError(f"no record file at {src} (expected LLaVA JSONL or a JSON array)")
    for what, path in (("--out", out), ("--rejects", rejects)):
        if path.is_dir():
            raise ValueError(f"{what} {path} is a folder; give a file path such as {path / 'filtered.jsonl'}")
        if any(path.resolve() == src.resolve() for src in sources):
            raise ValueError(
                f"{what} {path} is one of the inputs; write the filtered records to another file"
            )
    if out.resolve() == rejects.resolve():
        raise ValueError(f"--out and --rejects are the same file {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    flt = record_filter or RecordFilter()
    stats = FilterStats()
    # written next to their destinations and moved into place at the end: a failed run leaves no
    # complete-looking output behind
    tmp_out, tmp_rej = (p.with_name(f".{p.name}.{os.getpid()}.tmp") for p in (out, rejects))
    try:
        _filter_into(sources, out.parent, tmp_out, tmp_rej, flt, stats)
        os.replace(tmp_rej, rejects)
        os.replace(tmp_out, out)
    finally:
        tmp_out.unlink(missing_ok=True)
        tmp_rej.unlink(missing_ok=True)
    return stats


def _filter_into(
    sources: list[Path], out_dir: Path, tmp_out: Path, tmp_rej: Path, flt: RecordFilter, stats: FilterStats
) -> None:
    with tmp_out.open("w", encoding="utf-8") as keep_fh, tmp_rej.open("w", encoding="utf-8") as drop_fh:
        for src in sources:
            root = src.parent
            for line, rec in iter_records(src):
                stats.total += 1
                if isinstance(rec, str):
                    verdict: tuple[str, str] | None = ("json", rec)
                    rec_out: Any = None
                else:
                    verdict = flt.check(rec, root)
                    rec_out = rec
                if verdict is None:
                    stats.kept += 1
                    keep_fh.write(json.dumps(rebase_images(rec, root, out_dir), ensure_ascii=False) + "\n")
                    continue
                stats.dropped[verdict[0]] += 1
                prov = (rec_out or {}).get("provenance") or {}
                row = {
                    "id": (rec_out or {}).get("id"),
                    "source": prov.get("source"),
                    "rule": verdict[0],
                    "reason": verdict[1],
                    "file": str(src),
                    "line": line,
                    "record": rec_out,
                }
                drop_fh.write(json.dumps(row, ensure_ascii=False) + "\n")
