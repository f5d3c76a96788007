"""Process-wide tuning for the runner's own processes (daemon, keeper, forgehand CLI).

glibc serves every allocation above its mmap threshold (128 KiB, rising dynamically) with
a fresh mmap, and frees it with munmap. Output chunks and gRPC messages are 64 KiB to 4 MiB,
so each one costs page faults on first touch: on the VMs we measured, copying 1 MiB took
1.6 ms that way and 0.06 ms from reused heap memory (protobuf serialization of a 1 MiB
event: 2.6 ms vs 0.09 ms). Raising the threshold keeps such buffers on the heap; the trim
threshold bounds how much freed memory the process keeps.

That threshold also keeps what start-up freed (compiling a module whose bytecode cache is
stale, for one) until the process ends; a process about to fork gives it back first
(``release_free_memory``), so its child does not share pages that neither of them uses.

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


def release_free_memory() -> None:
    """Give the kernel back the heap's free pages (``malloc_trim``), whatever the trim
    threshold. Does nothing where glibc is not the allocator."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
