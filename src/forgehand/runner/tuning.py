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

The keeper forks the daemon after every import (``forgehand.runner.supervisor``), so its
page tables still map every page of the interpreter and of gRPC's and protobuf's
libraries that the imports touched. Those are page-cache pages, counted in the PSS of
each process that maps them, and the keeper, idle in a selector loop, uses few of them:
it unmaps the clean ones once it has forked the daemon (``forget_file_pages``). They
stay in the page cache, and the keeper faults back in what it uses (none of gRPC's
library). A sandbox alone carries about 2.4 MB less. The daemon gains nothing from the
same: serving one request faults most of what its start-up touched back in.
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path
from typing import NamedTuple

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # the largest value glibc accepts (HEAP_MAX/2)
TRIM_THRESHOLD_BYTES = 128 * 1024 * 1024
MADV_DONTNEED = 4


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


class FileMapping(NamedTuple):
    start: int
    end: int
    resident: int  # bytes, when it was read
    path: str


def clean_file_pages() -> list[FileMapping]:
    """This process's clean file mappings (see ``clean_file_mappings``); none where
    ``/proc`` cannot tell."""
    try:
        return clean_file_mappings(Path("/proc/self/smaps").read_text())
    except OSError:
        return []


def forget_file_pages(mappings: list[FileMapping]) -> int:
    """Unmap the pages of ``mappings`` (from ``clean_file_pages``): they stay in the page
    cache, and a later access faults them back in. Returns the resident bytes given up.

    The mappings must still be there as they were read, so no other thread may have run
    since: the keeper reads them before forking the daemon, which also keeps the read's
    allocations off the pages the two share."""
    dropped = 0
    with contextlib.suppress(OSError, AttributeError):
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for mapping in mappings:
            if madvise(mapping.start, mapping.end - mapping.start, MADV_DONTNEED) == 0:
                dropped += mapping.resident
    return dropped


def clean_file_mappings(smaps: str) -> list[FileMapping]:
    """Each private read-only mapping of a file with no private copies, from the text of
    ``/proc/PID/smaps``. Mappings holding private copies, in memory (``Anonymous``) or
    swapped out (``Swap``) — relocated data made read-only again —, and writable ones are
    left out: unmapping those would lose data."""
    found: list[FileMapping] = []
    candidate: tuple[int, int, str] | None = None
    counts: dict[str, int] = {}

    def settle() -> None:
        private_copies = counts.get("Anonymous", -1), counts.get("Swap", 0)
        if candidate is not None and private_copies == (0, 0):
            found.append(FileMapping(*candidate[:2], counts.get("Rss", 0) * 1024, candidate[2]))

    for line in smaps.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0].endswith(":"):
            if len(fields) >= 2 and fields[1].isdigit():
                counts[fields[0][:-1]] = int(fields[1])
            continue
        settle()  # a mapping's header line: the one before is complete
        candidate, counts = None, {}
        span, perms = fields[0], fields[1]
        path = " ".join(fields[5:])
        regular = path.startswith("/") and not path.endswith("(deleted)")
        if regular and "w" not in perms and perms.endswith("p"):
            low, high = span.split("-")
            candidate = (int(low, 16), int(high, 16), path)
    settle()
    return found
