"""Durable, atomic file output shared by saving, checkpointing and exporting.

A folder is built under a temporary name next to its destination, fsynced, then renamed: a failed or killed
write leaves nothing at the destination, and an existing folder stays untouched until the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["fsync_path", "fsync_tree", "jsonl_lines", "staged_folder"]


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSON Lines text, split on ``\\n`` only (a trailing ``\\r`` dropped).

    ``str.splitlines`` also splits on U+2028, U+2029, U+0085 and \\x1c-\\x1e, which a JSON string may hold
    unescaped (``ensure_ascii=False`` writers): one record would become two broken lines.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def fsync_path(path: Path) -> None:
    """fsync one file or folder (folders that the file system cannot open are skipped)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some file systems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> dict[str, int]:
    """fsync every file and folder under ``root`` (so a rename publishes complete data); returns
    ``{relative path: size}`` of the files."""
    sizes = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            fsync_path(path)
            sizes[str(path.relative_to(root))] = path.stat().st_size
        fsync_path(Path(dirpath))
    return sizes


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for every thread, for a moment)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_modes(root: Path) -> None:
    """The modes a plain ``mkdir`` / ``open`` would give (the umask applied): ``mkdtemp`` makes its folder
    private (0700) and some writers make files 0600, which would hide a shared model folder from its group."""
    umask = _umask()
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def staged_folder(out: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes ``out`` when the block succeeds.

    Args:
        out: destination folder.
        overwrite: replace an existing ``out`` (only after the new folder is complete).

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is not set.
    """
    dest = Path(out).expanduser().resolve()
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists; choose another output folder or pass --overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        _usual_modes(tmp)
        fsync_tree(tmp)
        backup = None
        if dest.exists():
            backup = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.rename(dest, backup)
        os.rename(tmp, dest)
        fsync_path(dest.parent)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
