"""A tiny per-sandbox reaper for runtimes that daemonize, like ``runsc run --detach``.

    python3 -I -S subreaper.py COMMAND [ARG…]

``runsc run --detach`` starts the sandbox and gofer processes and exits, so they are
re-parented to the nearest child subreaper, or to PID 1. When the sandbox is deleted, they
and gVisor's systrap stub processes (which are re-parented in turn) exit, and only their
new parent can reap them. PID 1 on many machines (containers, CI VMs) never reaps orphans,
so each sandbox used to leave a dozen zombies behind.

This process makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``), runs COMMAND
with its stdout sent to stderr, writes COMMAND's exit code as one line to stdout and closes
it, then reaps every descendant that ends up with it, until it has no child left; then it
exits 0. Its owner starts it in a new session (so terminal signals do not reach it) and
waits for it after deleting the sandbox. If the owner crashes, this process stays and
reaps once ``forgehand sandbox gc`` deletes the sandbox.

Standard library only: it runs as a script, isolated from any site-packages. It is the
fallback for ``subreaper.c``, the same contract compiled (0.3 MB of PSS instead of about
4 MB), which ``scripts/setup`` builds when the machine has a C compiler.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_CHILD_SUBREAPER = 36
NOT_STARTED = 127


def become_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants, or raise OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")


def report(code: int) -> None:
    """Tell the owner COMMAND's exit code; fine if the owner is gone."""
    try:
        os.write(1, f"{code}\n".encode())
        os.close(1)
    except OSError:
        pass


def reap_all(child: int) -> None:
    """Wait for every child until none is left; report ``child``'s exit code on the way."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        if pid == child:
            report(os.waitstatus_to_exitcode(status))


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: subreaper.py COMMAND [ARG…]", file=sys.stderr)
        return 2
    try:
        become_subreaper()
        actions = [(os.POSIX_SPAWN_DUP2, 2, 1)]
        child = os.posix_spawnp(argv[0], argv, dict(os.environ), file_actions=actions)
    except OSError as exc:
        print(f"subreaper: cannot start {argv[0]}: {exc}", file=sys.stderr)
        report(NOT_STARTED)
        return 1
    reap_all(child)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
