"""The resumable conversion runner: converter cases -> 8-bit PNGs -> generator records, appended losslessly.

Workers (a process pool) decode images, write PNGs and run the generator; the parent alone appends to the
output files through :class:`~cambrian_core.data.output_store.OutputStore`, in the converter's order, so an
interrupted run continued later writes exactly what an uninterrupted one would have. ``shard=(i, n)`` keeps the
cases whose stable hash of ``case_id`` is ``i`` modulo ``n``; ``limit`` keeps the first cases of the shard.

Outcomes per case: **converted** (records written, id in ``done.txt``); **rejected** (bad input or output, a
generator's :class:`~cambrian_core.data.generators.base.CaseRejected` included: the reason in ``rejects.jsonl``,
id in ``done.txt``: not retried); **failed** (an unexpected error such as a network
failure: recorded in ``rejects.jsonl`` with ``"retry": true`` but not marked done, so a rerun retries it).
A generator error that no later case can escape (:class:`~cambrian_core.data.generators.base.StopRun`: a rejected
API key, a wrong endpoint) stops the run after committing what finished (:class:`RunStopped`).

A generator with ``concurrency > 1`` (remote APIs) has that many cases in flight in each process (threads), in
addition to ``workers`` processes; results are still committed in the converter's order. The records' API usage
(``provenance.usage``) is summed into the summary, whichever process made the calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing as mp
import os
import re
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cambrian_core.data.case import Case, Reject
from cambrian_core.data.converter import Converter
from cambrian_core.data.generators.base import CaseRejected, Generator, StopRun
from cambrian_core.data.medimage import ImageLoadError, load_image, to_png_bytes
from cambrian_core.data.output_store import OutputStore
from cambrian_core.data.records import conversation_problem

__all__ = ["RunStopped", "Summary", "convert", "in_shard", "parse_shard"]

log = logging.getLogger(__name__)

#: PNG zlib level for rendered images (1: fast, files ~10 % larger than the default 6)
PNG_COMPRESS_LEVEL = 1


class RunStopped(RuntimeError):
    """The generator said no later case can succeed; what finished is committed, a rerun continues."""


@dataclass
class Summary:
    """What one ``convert`` call did (also written to ``OUT/summary.json``)."""

    source: str
    generator: str
    out_dir: str
    shard: tuple[int, int] = (0, 1)
    converted: int = 0
    records: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # by kind: converter, image, record, generator
    failed: int = 0  # errors not marked done: retried by a rerun
    skipped: dict[str, int] = field(default_factory=dict)  # already_done, other_shard, over_limit
    examples: list[str] = field(default_factory=list)  # a few reject / failure reasons
    total_done: int = 0
    total_records: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    stopped: str | None = None  # why the generator stopped the run (StopRun)
    #: API usage of the converted cases, summed from their records: requests (attempts, re-asks included),
    #: prompt_tokens, completion_tokens; empty for generators that make no calls
    usage: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A few human-readable lines for the end of a run."""
        rate = self.converted / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"{self.source} -> {self.out_dir} (generator {self.generator}, shard {self.shard[0]}/{self.shard[1]})",
            f"  converted {self.converted} cases into {self.records} records in {self.elapsed_s:.1f}s "
            f"({rate:.1f} cases/s)",
        ]
        if self.rejected:
            by = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items()))
            lines.append(f"  rejected {sum(self.rejected.values())} ({by}); reasons in rejects.jsonl")
        if self.failed:
            lines.append(f"  failed {self.failed} with errors (not marked done: run again to retry them)")
        if any(self.skipped.values()):
            lines.append("  skipped " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()) if v))
        if self.usage:
            u = self.usage
            lines.append(
                f"  API usage: {u.get('requests', 0)} requests, {u.get('prompt_tokens', 0)} prompt + "
                f"{u.get('completion_tokens', 0)} completion tokens"
            )
        lines += [f"    e.g. {e}" for e in self.examples]
        lines.append(f"  folder total: {self.total_done} cases done, {self.total_records} records")
        if self.interrupted:
            lines.append("  INTERRUPTED: run the same command again to continue")
        if self.stopped:
            lines.append(f"  STOPPED: {self.stopped}; fix it and run the same command again to continue")
        return "\n".join(lines)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard must be i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def in_shard(case_id: str, shard: tuple[int, int]) -> bool:
    """Stable across machines and Python versions (no ``hash()`` randomisation)."""
    i, n = shard
    if n == 1:
        return True
    return int.from_bytes(hashlib.sha1(case_id.encode("utf-8")).digest()[:8], "big") % n == i


def image_stem(case_id: str) -> str:
    """A file-system-safe, collision-free stem for a case's PNGs."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip("._")[:120] or "case"
    if safe != case_id:
        safe += "-" + hashlib.sha1(case_id.encode("utf-8")).hexdigest()[:8]
    return safe


# --------------------------------------------------------------------------------------------------- worker

_STATE: dict[str, Any] = {}


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:  # the parent was killed: stop instead of idling as an orphan
            os._exit(1)


def _init_worker(
    converter: Converter, generator: Generator, out_dir: str, max_size: int | None, parent: int | None
) -> None:
    _STATE.update(converter=converter, generator=generator, out=Path(out_dir), max_size=max_size)
    if parent is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _finalize(rec: dict, case: Case, k: int, images: list[Path], out: Path) -> dict:
    conv, gen = _STATE["converter"], _STATE["generator"]
    image = rec.get("image", [str(p) for p in images])
    paths = [image] if isinstance(image, (str, os.PathLike)) else list(image or [])
    rel = []
    for p in paths:
        p = Path(p)
        rel.append(
            p.relative_to(out).as_posix() if p.is_absolute() and p.is_relative_to(out) else p.as_posix()
        )
    final: dict[str, Any] = {"id": f"{case.source}:{case.case_id}:{k}"}
    if rel:
        final["image"] = rel[0] if len(rel) == 1 else rel
    final["conversations"] = rec.get("conversations")
    final["stage"] = rec.get("stage", "instruct")
    for key, value in rec.items():  # generator extras (usage, model, ...) are kept
        if key not in ("id", "image", "conversations", "stage", "provenance"):
            final[key] = value
    provenance = dict(rec.get("provenance") or {})
    provenance.update(
        source=case.source,
        source_id=case.case_id,
        generator=gen.name,
        prompt_version=gen.prompt_version,
        license=getattr(conv, "license", None),
    )
    if case.group is not None:
        provenance["group"] = case.group
    final["provenance"] = provenance
    return final


def _process(item: Case | Reject) -> tuple[str, str, Any]:
    """``(case_id, "ok" | "reject" | "error" | "stop", records | (kind, reason))``: never raises."""
    if isinstance(item, Reject):
        return item.case_id, "reject", ("converter", item.reason)
    conv, gen, out = _STATE["converter"], _STATE["generator"], _STATE["out"]
    try:
        folder = out / "images" / item.source
        folder.mkdir(parents=True, exist_ok=True)
        stem = image_stem(item.case_id)
        paths = []
        for i, ref in enumerate(item.images):
            opts = {"max_size": _STATE["max_size"]} if _STATE["max_size"] else {}
            try:
                img = load_image(ref, **opts)
            except ImageLoadError:
                raise
            except Exception as exc:  # a header the loader did not foresee: this image's fault, named
                raise ImageLoadError(ref.path, f"{type(exc).__name__}: {exc}") from exc
            # "@" never occurs in a stem, so view i of case "x" cannot be the single image of a case "x_1"
            dest = folder / (f"{stem}.png" if len(item.images) == 1 else f"{stem}@{i}.png")
            _write_atomic(dest, to_png_bytes(img, compress_level=PNG_COMPRESS_LEVEL))
            paths.append(dest)
        raw = gen.generate(conv, item, paths)
    except ImageLoadError as exc:
        return item.case_id, "reject", ("image", str(exc))
    except (ValueError, CaseRejected) as exc:  # bad labels / unusable generator output: not retried
        return item.case_id, "reject", ("generator", f"{type(exc).__name__}: {exc}")
    except StopRun as exc:
        return item.case_id, "stop", ("error", f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        return item.case_id, "error", ("error", f"{type(exc).__name__}: {exc}")
    if not raw:
        return item.case_id, "reject", ("record", "no record: no caption and no QA could be built")
    records = []
    for k, rec in enumerate(raw):
        final = _finalize(rec, item, k, paths, out)
        problem = conversation_problem(final)
        if problem:
            return item.case_id, "reject", ("record", f"record {k}: {problem}")
        records.append(final)
    return item.case_id, "ok", records


# --------------------------------------------------------------------------------------------------- parent


def _select(
    converter: Converter, done: set[str], shard: tuple[int, int], limit: int | None, skipped: Counter
) -> list[Case | Reject]:
    todo, seen, position = [], set(), 0
    for item in converter.iter_cases():
        cid = item.case_id
        if "\n" in cid or not cid:
            raise ValueError(f"{type(converter).__name__} yielded an invalid case id {cid!r}")
        if cid in seen:
            skipped["duplicate_id"] += 1
            continue
        seen.add(cid)
        if not in_shard(cid, shard):
            skipped["other_shard"] += 1
            continue
        position += 1
        if limit is not None and position > limit:
            skipped["over_limit"] += 1
            continue
        if cid in done:
            skipped["already_done"] += 1
            continue
        todo.append(item)
    return todo


def _start_pool(workers: int, initargs: tuple) -> Any:
    """A spawn pool whose workers import and unpickle the converter / generator once each."""
    ctx = mp.get_context("spawn")  # no fork: the parent may hold threads (tqdm, torch) and locks
    return ctx.Pool(workers, initializer=_init_worker, initargs=(*initargs, os.getpid()))


def _in_order(fn: Callable[[Any], Any], items: Iterable[Any], threads: int) -> Iterator[Any]:
    """``map(fn, items)`` with up to ``threads`` calls running at once (a bounded window), results in order."""
    if threads <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="convert")
    window: deque[Future] = deque()
    try:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:  # a consumer that stops early (Ctrl-C, StopRun) leaves nothing queued behind
        pool.shutdown(wait=True, cancel_futures=True)


def _process_group(group: list[Case | Reject]) -> list[tuple[str, str, Any]]:
    """A worker process's share of cases, ``generator.concurrency`` at a time."""
    return list(_in_order(_process, group, _STATE["generator"].concurrency))


def _results(
    todo: list[Case | Reject], workers: int, initargs: tuple, pool: Any
) -> Iterator[tuple[str, str, Any]]:
    threads = max(1, int(getattr(initargs[1], "concurrency", 1)))
    if pool is None:
        _init_worker(*initargs, None)
        yield from _in_order(_process, todo, threads)
        return
    if threads > 1:  # each worker takes groups of cases and runs them on its own threads
        size = 2 * threads
        groups = [todo[i : i + size] for i in range(0, len(todo), size)]
        for results in pool.imap(_process_group, groups):
            yield from results
    else:
        chunk = max(1, min(8, len(todo) // (workers * 16)))
        yield from pool.imap(_process, todo, chunksize=chunk)
    pool.close()
    pool.join()


def convert(
    converter: Converter,
    generator: Generator,
    out_dir: str | os.PathLike,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    limit: int | None = None,
    progress: bool = True,
    max_size: int | None = None,
    batch_size: int = 64,
    flush_seconds: float = 2.0,
) -> Summary:
    """Convert ``converter``'s source into ``out_dir`` with ``generator``; resumable (see the module docstring).

    Raises:
        LayoutError: the input as a whole is unusable (from ``converter.check_layout``).
        RunConflictError: ``out_dir`` is in use, or holds a run with other settings.
        RunStopped: the generator raised :class:`StopRun` (after committing everything finished so far).
        KeyboardInterrupt: after committing everything finished so far.
    """
    from tqdm import tqdm

    start = time.monotonic()
    converter.check_layout()
    out = Path(out_dir).resolve()
    recorded = ("views", *converter.options)  # under their own keys below
    run_info = {
        "source": converter.name,
        "generator": generator.name,
        "prompt_version": generator.prompt_version,
        "views": converter.views,
        "options": {k: repr(v) for k, v in sorted(converter.options.items())},
        # the converter's own keywords (DeepLesion drop_noisy, Quilt split...) and src: other values, other cases
        "arguments": {k: v for k, v in converter.arguments().items() if k not in recorded},
        "shard": list(shard),
        "max_size": max_size,
    }
    store = OutputStore(out, run_info)
    summary = Summary(source=converter.name, generator=generator.name, out_dir=str(out), shard=tuple(shard))
    skipped: Counter = Counter()
    rejected: Counter = Counter()
    usage: Counter = Counter()
    initargs = (converter, generator, str(out), max_size)
    pool = None
    try:
        if workers > 1:  # workers start up while the parent selects the cases
            pool = _start_pool(workers, initargs)
        if any(store.dropped.values()):
            log.info("resuming %s: dropped %s lines of unfinished cases", out, sum(store.dropped.values()))
        for tmp in (out / "images").glob("*/.*.tmp"):  # half-written PNGs of a killed run
            tmp.unlink(missing_ok=True)
        todo = _select(converter, store.done, shard, limit, skipped)
        bar = tqdm(total=len(todo), unit="case", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        batch: list[tuple[str, str, Any]] = []
        last = time.monotonic()

        def flush() -> None:
            records, rejects, finished = [], [], []
            for cid, status, payload in batch:
                if status == "ok":
                    records += payload
                    finished.append(cid)
                    summary.converted += 1
                    summary.records += len(payload)
                    for rec in payload:
                        spent = (rec.get("provenance") or {}).get("usage") or {}
                        usage["requests"] += int(spent.get("attempts") or 0)
                        usage["prompt_tokens"] += int(spent.get("prompt_tokens") or 0)
                        usage["completion_tokens"] += int(spent.get("completion_tokens") or 0)
                    continue
                kind, reason = payload
                rejects.append({"source": converter.name, "case_id": cid, "reason": reason, "kind": kind})
                if status == "reject":
                    finished.append(cid)
                    rejected[kind] += 1
                else:
                    rejects[-1]["retry"] = True
                    summary.failed += 1
                if len(summary.examples) < 5:
                    summary.examples.append(f"{cid}: {reason}")
            store.commit(records, rejects, finished)
            batch.clear()

        try:
            for result in _results(todo, workers, initargs, pool):
                batch.append(result)
                bar.update(1)
                if result[1] == "stop":
                    summary.stopped = result[2][1]
                    break
                if len(batch) >= batch_size or time.monotonic() - last >= flush_seconds:
                    flush()
                    last = time.monotonic()
                    bar.set_postfix(rejected=sum(rejected.values()), failed=summary.failed, refresh=False)
            flush()
        except KeyboardInterrupt:
            flush()
            summary.interrupted = True
            raise
        finally:
            bar.close()
    finally:
        if pool is not None:
            pool.terminate()
        summary.rejected = dict(rejected)
        summary.skipped = dict(skipped)
        summary.total_done = len(store.done)
        summary.total_records = store.n_records
        summary.elapsed_s = round(time.monotonic() - start, 3)
        summary.usage = (
            {k: usage[k] for k in ("requests", "prompt_tokens", "completion_tokens")} if usage else {}
        )
        with contextlib.suppress(OSError):
            store.write_summary(summary.to_dict())
        store.close()
    if summary.stopped:
        raise RunStopped(
            f"{summary.stopped}\nstopped after committing {summary.converted} converted and "
            f"{sum(summary.rejected.values())} rejected cases; fix the problem and run the same command again"
        )
    return summary
