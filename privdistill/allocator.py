"""glibc malloc settings for CPU torch work, applied once per process by the command-line tools.

Torch on CPU allocates and frees activation buffers of a few hundred KiB to tens of MiB at every step. With glibc's
defaults each such buffer is an ``mmap`` (above the dynamic mmap threshold) or heap memory trimmed back to the kernel
on ``free``; either way the next step faults the same pages in again, zero-filled by the kernel. The two-site demo
took 107 million minor page faults and 204 s of system time (of 2,429 s CPU). Keeping freed memory in the process
(mmap threshold at glibc's maximum, 32 MiB on 64-bit; trim threshold 1 GiB; top pad 256 MiB) removes most of that:
``benchmarks/allocator.py`` measures the demo's training step and membership-attack forward passes both ways.

The cost is memory: a process keeps up to ~1.3 GiB of freed heap instead of returning it at once (its peak RSS does
not grow). ``PRIVDISTILL_MALLOC_TUNING=0`` turns it off; on a C library other than glibc it does nothing."""

from __future__ import annotations

import ctypes
import os

import structlog

log = structlog.get_logger(__name__)

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {
    "mmap_threshold": (M_MMAP_THRESHOLD, 32 << 20),  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
    "trim_threshold": (M_TRIM_THRESHOLD, 1 << 30),
    "top_pad": (M_TOP_PAD, 256 << 20),
}
ENV_SWITCH = "PRIVDISTILL_MALLOC_TUNING"
_applied: dict[str, bool] | None = None


def tune_malloc() -> dict[str, bool]:
    """Apply ``SETTINGS`` through ``mallopt`` (once per process); returns which settings glibc accepted ({} when off,
    not glibc, or no libc could be loaded)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = {}
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return _applied
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not Linux, or not glibc's soname (musl)
        return _applied
    if not hasattr(libc, "gnu_get_libc_version"):  # a libc.so.6 that is not glibc
        return _applied
    for name, (param, value) in SETTINGS.items():
        _applied[name] = bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
    log.debug("malloc.tuned", **_applied)
    return _applied
