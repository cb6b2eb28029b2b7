"""The conversion output folder: append-only JSONL plus a list of finished case ids, safe against kill -9.

Protocol: a batch's records and rejects are appended, flushed and fsynced **before** the batch's case ids are
appended (and fsynced) to ``done.txt``. A case is finished exactly when its id is a complete line of
``done.txt``. On open, a partial last line of any file is cut off and every record / reject of an unfinished
case is dropped, so a rerun redoes those cases and nothing is duplicated or lost.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["OutputStore", "RunConflictError"]

RECORDS, REJECTS, DONE, RUN, SUMMARY, LOCK = (
    "records.jsonl",
    "rejects.jsonl",
    "done.txt",
    "run.json",
    "summary.json",
    ".lock",
)


class RunConflictError(RuntimeError):
    """The output folder is in use by another run, or holds a run with other settings."""


def _record_case(line: dict) -> str | None:
    prov = line.get("provenance")
    return prov.get("source_id") if isinstance(prov, dict) else None


def _reject_case(line: dict) -> str | None:
    return line.get("case_id")


def _change(key: str, old: Any, new: Any) -> str:
    """``key: old there, new now``; for the dicts of ``repr`` strings (options, arguments) one part per entry."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return f"{key}: {old!r} there, {new!r} now"
    return ", ".join(
        f"{key}.{k}: {old.get(k, 'unset')} there, {new.get(k, 'unset')} now"
        for k in sorted({*old, *new})
        if old.get(k) != new.get(k)
    )


class OutputStore:
    """Opens (and repairs) ``out_dir``, then appends committed batches durably."""

    def __init__(self, out_dir: str | os.PathLike, run_info: dict[str, Any]) -> None:
        self.root = Path(out_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / LOCK, "w")  # noqa: SIM115 - held for the store's lifetime
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RunConflictError(f"{self.root} is in use by another conversion run") from None
        self._check_run_info(run_info)
        self.done = self._load_done()
        self.dropped = {
            RECORDS: self._trim(self.root / RECORDS, _record_case),
            REJECTS: self._trim(self.root / REJECTS, _reject_case),
        }
        self._records = open(self.root / RECORDS, "ab")  # noqa: SIM115
        self._rejects = open(self.root / REJECTS, "ab")  # noqa: SIM115
        self._done = open(self.root / DONE, "ab")  # noqa: SIM115
        self.n_records = self._count_lines(self.root / RECORDS)

    # -------------------------------------------------------------------------------------------- opening

    def _check_run_info(self, info: dict[str, Any]) -> None:
        path = self.root / RUN
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError:
                old = None
            # a key the folder's run.json lacks (written by an older version) is not checked
            if isinstance(old, dict):
                diff = [k for k in info if k in old and old[k] != info[k]]
                if diff:
                    what = ", ".join(_change(k, old[k], info[k]) for k in diff)
                    raise RunConflictError(
                        f"{self.root} holds a run with other settings ({what}); resume with the same settings "
                        "or choose another --out"
                    )
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def _load_done(self) -> set[str]:
        path = self.root / DONE
        if not path.exists():
            return set()
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # partial id from a kill mid-write: that case is not finished
            with open(path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        return {line for line in data[:end].decode("utf-8").split("\n") if line}

    def _trim(self, path: Path, case_of: Callable[[dict], str | None]) -> int:
        """Drop lines of unfinished cases (and a partial last line); returns how many lines went."""
        if not path.exists():
            return 0
        keep_until, kept, dropped, tail_only = 0, [], 0, True
        offset = 0
        with open(path, "rb") as f:
            for raw in f:
                end = offset + len(raw)
                ok = raw.endswith(b"\n")
                if ok:
                    try:
                        ok = case_of(json.loads(raw)) in self.done
                    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                        ok = False
                if ok:
                    kept.append(raw)
                    if dropped:
                        tail_only = False
                    keep_until = end
                else:
                    dropped += 1
                offset = end
        if not dropped:
            return 0
        if tail_only:
            with open(path, "r+b") as f:
                f.truncate(keep_until)
                os.fsync(f.fileno())
        else:  # not expected from this writer, but repair it all the same
            tmp = path.with_suffix(".repair")
            with open(tmp, "wb") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return dropped

    @staticmethod
    def _count_lines(path: Path) -> int:
        with open(path, "rb") as f:
            return sum(buf.count(b"\n") for buf in iter(lambda: f.read(1 << 20), b""))

    # -------------------------------------------------------------------------------------------- writing

    def commit(self, records: Iterable[dict], rejects: Iterable[dict], finished: Iterable[str]) -> None:
        """Append one batch: records and rejects first (fsynced), then the finished ids (fsynced)."""
        rec_lines = [json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records]
        rej_lines = [json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in rejects]
        ids = list(finished)
        for fh, lines in ((self._records, rec_lines), (self._rejects, rej_lines)):
            if lines:
                fh.write(b"".join(lines))
                fh.flush()
                os.fsync(fh.fileno())
        if ids:
            self._done.write("".join(f"{i}\n" for i in ids).encode("utf-8"))
            self._done.flush()
            os.fsync(self._done.fileno())
            self.done.update(ids)
        self.n_records += len(rec_lines)

    def write_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.root / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
        os.replace(tmp, self.root / SUMMARY)

    def close(self) -> None:
        for fh in (self._records, self._rejects, self._done):
            fh.close()
        self._lock.close()
