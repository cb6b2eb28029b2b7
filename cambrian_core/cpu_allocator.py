"""Keep freed host memory in the process heap, so large CPU tensors do not page-fault on every allocation.

glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh ``mmap`` pages and unmaps them
on free, so every large activation or gradient of a CPU training or inference step is first-touched page by
page: on the SVA connector at the Cambrian-8B shape a 36 MiB tensor costs ~11 ms to allocate and fill
instead of ~1 ms. PyTorch's CPU tuning guides recommend jemalloc or TCMalloc through ``LD_PRELOAD`` for this;
``tune_cpu_allocator`` gets the same effect from glibc itself (``mallopt``: no mmap-served blocks, trim only
above 1 GiB of free heap), with nothing to install. The ``cambrian`` commands call it at start.

Set ``CAMBRIAN_CPU_ALLOCATOR=system`` to keep glibc's defaults (the process then returns freed memory to the
OS sooner). Nothing changes when another allocator is preloaded or the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["ENV", "tune_cpu_allocator"]

log = logging.getLogger(__name__)

#: environment variable: ``system`` keeps the C library's defaults
ENV = "CAMBRIAN_CPU_ALLOCATOR"
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_BYTES = 1 << 30
_state: dict[str, bool] = {}


def tune_cpu_allocator() -> bool:
    """Switch glibc's malloc to heap-only allocation with a 1 GiB trim threshold; ``True`` when applied.

    Idempotent. Skipped (``False``) with ``CAMBRIAN_CPU_ALLOCATOR=system``, off Linux, without glibc's
    ``mallopt``, or when jemalloc / TCMalloc / mimalloc is preloaded.
    """
    if "applied" in _state:
        return _state["applied"]
    applied = False
    preload = os.environ.get("LD_PRELOAD", "")
    if (
        os.environ.get(ENV, "").strip().lower() != "system"
        and sys.platform.startswith("linux")
        and not any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc"))
    ):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES))
    log.debug("CPU allocator: %s", "heap-only (mallopt)" if applied else "system defaults")
    _state["applied"] = applied
    return applied
