"""Keep freed memory in the process instead of handing it back to the system (glibc only).

A restoration network allocates and frees tensors of a few to a few tens of MB hundreds of times per image.
glibc's ``malloc`` serves blocks above its *mmap threshold* (128 KiB at first, raised step by step as large
blocks are freed) with fresh pages from the kernel and returns memory above its *trim threshold* to the
kernel as soon as it is free, so the next tensor of the same size page-faults its memory in again: a
cost of the order of the arithmetic on it. ``keep_freed_memory()`` sets both thresholds once (mmap 32 MiB, the
largest glibc accepts; trim 512 MiB) so those blocks are reused from the heap. The command line does this at
start-up; library users may call it. The cost: up to 512 MiB of freed memory may stay in the process.

``QMAMBAIR_MALLOC=default`` leaves glibc's behaviour as it is. Elsewhere (macOS, Windows, musl) the call does
nothing. ``benchmarks/allocator.py`` measures the effect.

Tracing a model for export is the opposite case: thousands of blocks below 32 MiB whose lifetimes interleave,
which fragment the heap (a 64×64 ONNX export of MambaIR-light grew to many GB resident with the heap serving
them, an order of magnitude more than with fresh pages). ``fresh_pages_above`` serves such blocks from the
kernel while an export runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator

ENV_VAR = "QMAMBAIR_MALLOC"
M_TRIM_THRESHOLD = -1  # mallopt parameter numbers of glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit systems
TRIM_THRESHOLD = 512 * 1024 * 1024
GLIBC_INITIAL = (128 * 1024, 128 * 1024)  # glibc's starting (mmap, trim) thresholds
_settings = {"current": GLIBC_INITIAL}  # the thresholds last set here (glibc's own at first)


def _mallopt():
    """glibc's ``mallopt``, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return None
    fn = libc.mallopt
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def set_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's mmap and trim thresholds (bytes); False where that is not possible."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    done = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    if done:
        _settings["current"] = (mmap_threshold, trim_threshold)
    return done


@contextlib.contextmanager
def fresh_pages_above(mmap_threshold: int = GLIBC_INITIAL[0]) -> Iterator[None]:
    """Serve blocks above ``mmap_threshold`` bytes with fresh pages (returned when freed) inside the context,
    then set the thresholds back to those last set here (glibc's starting values, now fixed, if none were)."""
    before = _settings["current"]
    set_thresholds(mmap_threshold, before[1])
    try:
        yield
    finally:
        set_thresholds(*before)


def keep_freed_memory() -> bool:
    """Reuse freed tensor memory instead of returning it to the kernel (see the module docstring).

    Returns whether the settings were applied: False without glibc or with ``QMAMBAIR_MALLOC=default``.
    """
    if os.environ.get(ENV_VAR, "").strip().lower() == "default":
        return False
    return set_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD)
