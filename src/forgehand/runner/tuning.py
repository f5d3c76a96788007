"""Process-wide tuning for forgehand's own Python processes (the runner's daemon, the
forgehand CLI).

glibc serves every allocation above its mmap threshold (128 KiB, rising dynamically) with
a fresh mmap, and frees it with munmap. Output chunks and gRPC messages are 64 KiB to 4 MiB,
so each one costs page faults on first touch: on the VMs we measured, copying 1 MiB took
1.6 ms that way and 0.06 ms from reused heap memory (protobuf serialization of a 1 MiB
event: 2.6 ms vs 0.09 ms). Raising the threshold keeps such buffers on the heap; the trim
threshold bounds how much freed memory the process keeps.

Only for processes forgehand owns: a library must not change its host's malloc.
"""

from __future__ import annotations

import contextlib
import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # the largest value glibc accepts (HEAP_MAX/2)
TRIM_THRESHOLD_BYTES = 128 * 1024 * 1024


def tune_malloc() -> bool:
    """Keep large short-lived buffers on the heap. Returns whether glibc accepted it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        trim_ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
        return bool(mmap_ok and trim_ok)
    return False
