"""Keep freed memory in the process on CPU training (glibc): no page faults for activations at every step.

PyTorch's CPU allocator asks the C library for every tensor and hands it back when the tensor dies. glibc serves
blocks above its mmap threshold (at most 32 MB; LiteMedSAM's stage-0 activations at 128x128 and batch 8 are
134 MB, its attention matrices 55 MB) with a fresh ``mmap`` and unmaps them on ``free``, and it trims the heap top
back to the kernel. So each training step faults in its ~2-3 GB of activations again, 4 KB page by page, each page
zeroed by the kernel: 1-2 s of a ~9 CPU-second teacher step went there (documentation/teacher.md, "CPU speed").
With mmap off and trimming off, freed blocks stay in the heap and the next step reuses them. The process keeps
its peak memory (which every step reaches anyway) instead of returning it between steps.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_INT_MAX = 2 ** 31 - 1
_applied = False


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory (``M_MMAP_MAX=0``, no heap trimming) for the rest of this process.
    True where it applied (Linux with glibc; idempotent), False elsewhere (nothing changed)."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    except (OSError, AttributeError):
        return False
    return _applied
