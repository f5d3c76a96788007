"""Host processes as ``/proc`` shows them: who is whose child, and process trees.

The OCI backends use it to name every host process that exists because of one sandbox
(``member_pids``: what ``forgehand bench sandbox`` sums the PSS of), and tests use it to
prove that a destroyed sandbox left no process and no zombie behind. The backends watch
a sandbox's main process through a pidfd (``pidfd_if``), not a host-side ``… wait``
process. All blocking: call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import select
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
KCMP_VM = 1
KCMP_SYSCALL = {"x86_64": 312, "aarch64": 272}
"""``kcmp``'s syscall number per machine (Python has no wrapper for it)."""


@dataclass(frozen=True)
class ProcessInfo:
    """One line of ``/proc/<pid>/stat``, the fields we use."""

    pid: int
    ppid: int
    state: str
    """``R``, ``S``, ``D``, ``Z`` (zombie) …"""
    comm: str
    start_ticks: int
    """Start time since boot in clock ticks: (pid, start_ticks) names a process for good."""


def read_process(pid: int) -> ProcessInfo | None:
    """The process ``pid``, or None if it is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    return ProcessInfo(pid, int(fields[1]), fields[0], comm, int(fields[19]))


def snapshot() -> dict[int, ProcessInfo]:
    """Every process on the host (those that vanish while we read are left out)."""
    table: dict[int, ProcessInfo] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (info := read_process(int(entry.name))) is not None:
            table[info.pid] = info
    return table


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces ('' if gone or a zombie)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def descendants(roots: Iterable[int], table: dict[int, ProcessInfo]) -> set[int]:
    """``roots`` that exist in ``table``, and all their descendants."""
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: set[int] = set()
    pending = [pid for pid in roots if pid in table]
    while pending:
        pid = pending.pop()
        if pid not in found:
            found.add(pid)
            pending += children.get(pid, [])
    return found


def children_mentioning(
    token: str, table: dict[int, ProcessInfo], parent: int | None = None
) -> set[int]:
    """Children of ``parent`` (default: this process) whose command line holds ``token``."""
    if not token:
        return set()
    parent = os.getpid() if parent is None else parent
    return {p for p, info in table.items() if info.ppid == parent and token in cmdline(p)}


def mentioning(token: str, table: dict[int, ProcessInfo], comm: str) -> set[int]:
    """Processes called ``comm`` whose command line holds ``token``."""
    if not token:
        return set()
    return {p for p, info in table.items() if info.comm == comm and token in cmdline(p)}


def open_pidfd(pid: int) -> int | None:
    """A pidfd of ``pid`` (close it), or None if there is no such process."""
    if pid <= 0:
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def has_exited(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` has exited (a pidfd turns readable then)."""
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


def pidfd_if(pid: int, belongs: Callable[[int], bool]) -> int | None:
    """A pidfd of ``pid`` if ``belongs(pid)`` holds for that very process, else None.

    The pid is checked after the pidfd is opened, and the pidfd is checked to be still
    running afterwards, so a pid reused in between is never mistaken for the process."""
    pidfd = open_pidfd(pid)
    if pidfd is None:
        return None
    try:
        if belongs(pid) and not has_exited(pidfd):
            return pidfd
    except OSError:
        pass
    os.close(pidfd)
    return None


def address_spaces(pids: Iterable[int]) -> list[int]:
    """One pid per distinct address space among ``pids`` (the lowest of each).

    Processes made with ``clone(CLONE_VM)`` but no ``CLONE_THREAD`` (gVisor's systrap stub
    processes) are separate pids that share one memory map, and each one's
    ``smaps_rollup`` shows all of it: summing them counts the same pages twice. Pids that
    ``kcmp`` cannot compare (another machine, no permission, gone) count as distinct."""
    number = KCMP_SYSCALL.get(platform.machine())
    distinct: list[int] = []
    if number is None:
        return sorted(set(pids))
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    for pid in sorted(set(pids)):
        if not any(syscall(number, seen, pid, KCMP_VM, 0, 0) == 0 for seen in distinct):
            distinct.append(pid)
    return distinct
