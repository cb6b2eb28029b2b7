"""Batched greedy generation over an evaluation set: sharded, resumable, through the serving engine.

Predictions are appended to ``<out>/predictions[.shard-I-of-N].jsonl`` (flushed and fsynced after every batch). A
rerun, with any shard layout, first reads every ``predictions*.jsonl`` in the folder and skips the question ids
that already have an answer; items whose generation failed (unreadable image, prompt too long) are recorded with
an ``error`` and retried by the next run. ``run.json`` pins the settings of a results folder (benchmark, split,
annotation hashes, model, its dtype, quantisation, tower paths and a fingerprint of its weight files, prompt, token
budget); a rerun with other settings, or after the model's weights changed, is refused instead of mixing answers.
A ``run.json`` written before a field was pinned does not check that field.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cambrian_core.eval.items import EvalSet, VQAItem
from cambrian_core.eval.prompts import question_prompt, resolve_style

__all__ = [
    "Answer",
    "EnginePredictor",
    "GenerationSummary",
    "Predictor",
    "Request",
    "RunMismatchError",
    "check_manifest",
    "finished_ids",
    "parse_shard",
    "predict_items",
    "read_predictions",
    "repair_tail",
    "run_generation",
    "shard_items",
    "weights_fingerprint",
]

log = logging.getLogger(__name__)

MANIFEST = "run.json"
#: manifest fields that must agree between runs writing to one folder
PINNED = (
    "benchmark",
    "split",
    "sources",
    "model",
    "dtype",
    "quantize",
    "tower_paths",
    "weights",
    "prompt",
    "max_new_tokens",
)
#: files holding weights, looked at by :func:`weights_fingerprint`
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npz")


class RunMismatchError(ValueError):
    """The results folder holds answers made with other settings."""


@dataclass(frozen=True)
class Request:
    """One question as put to the model."""

    item: VQAItem
    prompt: str


@dataclass(frozen=True)
class Answer:
    """What the model said (or why it could not answer)."""

    text: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Predictor(Protocol):
    """Anything that answers a batch of requests, in order."""

    name: str

    def predict(self, requests: Sequence[Request]) -> list[Answer]: ...


def _load_images(item: VQAItem) -> list[Any]:
    from cambrian_core.data.medimage import load_image

    return [load_image(p) for p in item.images]


class EnginePredictor:
    """Greedy answers from an :class:`~cambrian_core.serve.engine.InferenceEngine` (the serving path).

    A batch is submitted at once so the engine decodes it together (up to its ``max_batch_size``).
    """

    def __init__(self, engine: Any, max_new_tokens: int = 64) -> None:
        self.engine = engine
        self.name = engine.name
        self.max_new_tokens = max_new_tokens

    def predict(self, requests: Sequence[Request]) -> list[Answer]:
        from cambrian_core.serve.engine import SamplingParams

        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0)
        pending: list[Any] = []
        for req in requests:
            try:
                images = _load_images(req.item)
                pending.append(self.engine.submit_chat(req.prompt, images, params))
            except Exception as exc:  # one bad image or prompt must not sink the batch
                pending.append(Answer(error=f"{type(exc).__name__}: {exc}"))
        out = []
        for handle in pending:
            if isinstance(handle, Answer):
                out.append(handle)
                continue
            try:
                res = handle.wait()
            except Exception as exc:
                out.append(Answer(error=f"{type(exc).__name__}: {exc}"))
                continue
            out.append(Answer(res.text.strip(), res.finish_reason, res.prompt_tokens, res.completion_tokens))
        return out


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; ``None`` -> ``(0, 1)``."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard_items(items: Sequence[VQAItem], shard: tuple[int, int]) -> list[VQAItem]:
    """Every ``n``-th item starting at ``i`` (balanced shards that do not depend on item lengths)."""
    i, n = shard
    return list(items[i::n])


def _shard_file(out_dir: Path, shard: tuple[int, int]) -> Path:
    i, n = shard
    return out_dir / ("predictions.jsonl" if n == 1 else f"predictions.shard-{i}-of-{n}.jsonl")


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                return  # a line cut short by a kill; it is rewritten by the next run
            try:
                rec = json.loads(line)
            except ValueError:
                log.warning("%s: skipping an unreadable line", path)
                continue
            if isinstance(rec, dict) and "qid" in rec:
                yield rec


def read_predictions(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{qid: record}`` from every ``predictions*.jsonl`` in ``out_dir``; an answer beats a recorded error."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(out_dir).glob("predictions*.jsonl")):
        for rec in _lines(path):
            qid = str(rec["qid"])
            if qid not in out or ("error" in out[qid] and "error" not in rec):
                out[qid] = rec
    return out


def finished_ids(out_dir: str | Path) -> set[str]:
    """Question ids that already have an answer (errors are not finished)."""
    return {q for q, rec in read_predictions(out_dir).items() if "error" not in rec}


def repair_tail(path: Path) -> None:
    """Cut a trailing partial line (left by a kill mid-write) so appends start on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


def weights_fingerprint(*paths: str | os.PathLike[str]) -> str | None:
    """One line naming the weight files under ``paths`` (folders or files) by name, size and modification time:
    ``"2 files, 1007800 bytes, newest 2024-11-28 21:56:03 UTC, #3fa2c1d09e8b"``. Weights saved again over a
    folder change it (so does a copy that does not keep modification times); ``None`` when no path holds any (a
    registered checkpoint name, which is pinned by its name)."""
    digest = hashlib.sha1()
    count = size = newest = 0
    for k, root in enumerate(Path(p).expanduser() for p in paths):
        if root.is_file():
            files = [root]
        elif root.is_dir():
            files = sorted(f for f in root.rglob("*") if f.suffix in WEIGHT_SUFFIXES and f.is_file())
        else:
            continue
        for f in files:
            st = f.stat()
            rel = f.name if f == root else f.relative_to(root).as_posix()
            digest.update(f"{k}\t{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            count, size, newest = count + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    if not count:
        return None
    when = _dt.datetime.fromtimestamp(newest / 1e9, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    noun = "file" if count == 1 else "files"
    return f"{count} {noun}, {size} bytes, newest {when}, #{digest.hexdigest()[:12]}"


def _atomic_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_manifest(out_dir: str | Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``run.json`` on first use; afterwards refuse settings that differ in a pinned field."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in PINNED if k in manifest and k in old and old[k] != manifest[k]]
        if diff:
            shown = "; ".join(f"{k}: {old[k]!r} -> {manifest[k]!r}" for k in diff)
            if "weights" in diff:
                shown += "; the model's weight files changed since those answers"
            raise RunMismatchError(
                f"{out_dir} holds predictions made with other settings ({shown}); use another --out folder "
                "(or delete this one) instead of mixing answers"
            )
        return old
    _atomic_json(path, manifest)
    return dict(manifest)


@dataclass
class GenerationSummary:
    """What one generation run did."""

    path: Path
    generated: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def _batches(items: Sequence[VQAItem], size: int) -> Iterator[list[VQAItem]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def predict_items(
    items: Sequence[VQAItem],
    predictor: Predictor,
    batch_size: int = 8,
    prompt_style: str = "short",
    on_batch: Callable[[list[VQAItem], list[Answer]], None] | None = None,
) -> dict[str, Answer]:
    """Answer ``items`` in batches (no files); ``on_batch`` sees each batch as it completes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    resolve_style(prompt_style)
    out: dict[str, Answer] = {}
    for batch in _batches(items, batch_size):
        answers = predictor.predict([Request(it, question_prompt(it, prompt_style)) for it in batch])
        if len(answers) != len(batch):
            raise RuntimeError(
                f"predictor {predictor.name} returned {len(answers)} answers for {len(batch)} requests"
            )
        out.update({it.qid: a for it, a in zip(batch, answers, strict=True)})
        if on_batch is not None:
            on_batch(batch, answers)
    return out


def run_generation(
    evalset: EvalSet,
    predictor: Predictor,
    out_dir: str | Path,
    shard: tuple[int, int] = (0, 1),
    batch_size: int = 8,
    prompt_style: str = "short",
    progress: bool = False,
) -> GenerationSummary:
    """Answer this shard's unfinished items and append them to its predictions file (resumable)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = _shard_file(out_dir, shard)
    done = finished_ids(out_dir)
    mine = shard_items(evalset.items, shard)
    todo = [it for it in mine if it.qid not in done]
    summary = GenerationSummary(path, skipped=len(mine) - len(todo))
    if not todo:
        return summary
    repair_tail(path)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(todo), desc=f"{evalset.benchmark}/{evalset.split} {shard[0]}/{shard[1]}", unit="q"
        )
    t0 = time.perf_counter()
    with open(path, "a", encoding="utf-8") as f:

        def write(batch: list[VQAItem], answers: list[Answer]) -> None:
            for it, a in zip(batch, answers, strict=True):
                rec: dict[str, Any] = {"qid": it.qid}
                if a.error is not None:
                    rec["error"] = a.error
                    summary.failed += 1
                    summary.errors.append(f"{it.qid}: {a.error}")
                else:
                    rec.update(
                        prediction=a.text,
                        finish_reason=a.finish_reason,
                        prompt_tokens=a.prompt_tokens,
                        completion_tokens=a.completion_tokens,
                    )
                    summary.generated += 1
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if bar is not None:
                bar.update(len(batch))

        try:
            predict_items(todo, predictor, batch_size, prompt_style, on_batch=write)
        finally:
            if bar is not None:
                bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary
