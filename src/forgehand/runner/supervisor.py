"""``forgehand-runner serve --supervise``: the keeper supervises the daemon, at no extra cost.

Inside a sandbox the process the sandbox runs (bwrap's command, a container's init) must
outlive the daemon: when it exits, the pid namespace goes, and the keeper and every run
with it. So in this mode that process, once it has imported everything, *becomes the
keeper* and forks the daemon as its child::

    serve --supervise        the sandbox's command; the keeper (comm ``forgehand-keep``)
      ├─ daemon              forked: gRPC, attach streams; restarted when it crashes
      └─ runs                spawned by the keeper, as ever

Why the keeper and not a supervisor of its own: the keeper already is the long-lived
owner of the runs, with a selector loop that reaps its children; forking the daemon from
it costs no process beyond the two a sandbox had (daemon + forked keeper), and the
restarted daemon shares the interpreter and every module copy-on-write, so it serves
again within milliseconds. A stdlib-only supervisor (``python3 -I -S``, as
``forgehand.sandbox.subreaper``) measured 3.5 MB PSS on its own (2.9 MB of it private),
which a bwrap sandbox at 29-32 MB idle against a 30 MB target cannot afford; bwrap's idle
PSS with this mode is unchanged.

What ends the daemon, and what the supervisor then does:

- killed by a signal, or an unexpected exit status: remove its sockets at once, then fork
  a fresh daemon on the same state dir and socket. It finds the runs through the keeper
  and their journals; a client that was attached reconnects and resumes after its last
  seq. At most ``max_restarts`` within ``RESTART_WINDOW_SECONDS``: the next crash gives
  up. (Why remove the sockets: on a Linux kernel a dead daemon's socket refuses
  connections, but under gVisor with ``--host-uds=create`` the gofer keeps the listener it
  bound, which accepts connections nobody serves. With the file gone a client redials
  until the new daemon has bound it again.)
- status 0 (it was told to stop: SIGTERM or SIGINT) or 2 (invalid settings, a busy state
  dir: a new daemon would fail the same way): stop.
- SIGTERM to the supervisor (a deliberate stop of the sandbox): stop.

Stopping (also giving up): SIGKILL every run's process group, SIGTERM the daemon (SIGKILL
after ``STOP_GRACE_SECONDS``), exit — 0 for a deliberate stop, 1 after giving up, 2 for
invalid settings — so the host sees the sandbox end. The daemon dies with the supervisor
(``PR_SET_PDEATHSIG``), so neither is left behind outside a pid namespace either.

The first daemon is the one that gets ``--ready-fd``; restarted ones announce nothing.
The OOM killer protection the bwrap backend gives the first daemon (``oom_score_adj``)
is not inherited by a restarted one: lowering a score takes a privilege the sandbox lacks.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from forgehand.runner.keeper import (
    KEEPER_COMM,
    Keeper,
    KeeperSettings,
    _set_comm,
    _signal_group,
    listen,
    signal_name,
)
from forgehand.runner.tuning import clean_file_pages, forget_file_pages, release_free_memory

MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 60.0
STOP_GRACE_SECONDS = 2.0
SETTINGS_EXIT = 2  # the daemon's status for invalid settings: restarting cannot help
GAVE_UP_EXIT = 1
PR_SET_PDEATHSIG = 1

RunDaemon = Callable[[int | None], int]
"""Serve as the daemon until told to stop; gets the ready fd (first daemon only), returns
the exit status."""


def supervise(
    settings: KeeperSettings,
    run_daemon: RunDaemon,
    ready_fd: int | None = None,
    max_restarts: int = MAX_RESTARTS,
    sockets: Sequence[Path] = (),
) -> int:
    """Be the keeper of ``settings.state_dir`` and the daemon's supervisor; the exit status.
    ``sockets``: the daemon's listening sockets, removed when it dies.

    Call it after the imports, before any thread, event loop or gRPC object exists.
    """
    comm = _own_comm()
    _set_comm(KEEPER_COMM)
    listener = listen(settings)
    if listener is None:
        _say(f"another keeper holds {settings.state_dir}: stop it or choose another --state-dir")
        return SETTINGS_EXIT
    keeper = Keeper(settings, listener)
    keeper.install_signals()
    supervisor = Supervisor(keeper, run_daemon, comm, max_restarts, tuple(sockets))
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stop(0, "stopping on SIGTERM"))
    try:
        supervisor.start_daemon(ready_fd)
    except OSError as exc:  # e.g. the sandbox's pids limit
        _say(f"cannot fork the daemon: {exc}")
        return GAVE_UP_EXIT
    finally:
        if ready_fd is not None:
            os.close(ready_fd)  # the daemon has its copy; EOF must follow its death
    keeper.serve_forever()
    supervisor.shutdown()
    return supervisor.exit_code


class Supervisor:
    """Forks the daemon from the keeper's process, and again each time it crashes."""

    def __init__(
        self,
        keeper: Keeper,
        run_daemon: RunDaemon,
        comm: str,
        max_restarts: int,
        sockets: tuple[Path, ...] = (),
    ):
        self.keeper = keeper
        self.sockets = sockets
        self.run_daemon = run_daemon
        self.comm = comm
        self.max_restarts = max_restarts
        self.restarts: deque[float] = deque()
        self.daemon_pid = 0
        self.exit_code = 0
        self.reason = ""
        self._pid = os.getpid()

    def start_daemon(self, ready_fd: int | None = None) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        imports = clean_file_pages()  # read before the fork: see forget_file_pages
        release_free_memory()  # freed at start-up (and by that read): no need to share it
        gc.freeze()  # the collector would otherwise touch, and so copy, every shared object
        pid = os.fork()
        if pid == 0:
            self._be_daemon(ready_fd)
        self.daemon_pid = pid
        self.keeper.children[pid] = self.daemon_exited
        forget_file_pages(imports)  # the imports' pages: the daemon maps what it uses

    def daemon_exited(self, status: int) -> None:
        self.daemon_pid = 0
        for path in self.sockets:
            with contextlib.suppress(OSError):
                path.unlink()
        code = os.waitstatus_to_exitcode(status)
        if code in (0, SETTINGS_EXIT):
            self.stop(code, f"the daemon exited with status {code}: stopping")
            return
        why = f"killed by {signal_name(-code)}" if code < 0 else f"exited with {code}"
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW_SECONDS:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            self.stop(GAVE_UP_EXIT, f"the daemon was {why} after {len(self.restarts)} restarts")
            return
        self.restarts.append(now)
        _say(f"the daemon was {why}: restarting it")
        try:
            self.start_daemon()
        except OSError as exc:
            self.stop(GAVE_UP_EXIT, f"cannot fork a new daemon ({exc}): giving up")

    def stop(self, code: int, why: str) -> None:
        """Leave the keeper's loop at its next turn; ``shutdown`` then ends everything.
        Safe in a signal handler: it only sets attributes."""
        if not self.keeper.stopping:
            self.exit_code, self.reason = code, why
        self.keeper.stopping = True

    def shutdown(self) -> None:
        _say(self.reason)
        for run in self.keeper.runs.values():
            _signal_group(run, signal.SIGKILL)
        if self.daemon_pid:
            _end_child(self.daemon_pid, STOP_GRACE_SECONDS)
            self.daemon_pid = 0

    def _be_daemon(self, ready_fd: int | None) -> NoReturn:
        """The forked child: shed the keeper's state, then serve as the daemon."""
        code = 1
        try:
            _reset_for_daemon(self._pid, self.comm, ready_fd)
            code = self.run_daemon(ready_fd)
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)


def _reset_for_daemon(parent: int, comm: str, ready_fd: int | None) -> None:
    """Undo what the keeper set up: its signal handling, its fds (the lock, the sockets,
    the runs' pipes), its name; and die with it."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the keeper died before the prctl
        os._exit(GAVE_UP_EXIT)
    keep = ready_fd if ready_fd is not None and ready_fd > 2 else 2
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    _set_comm(comm)


def _end_child(pid: int, grace: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.01)
    except ChildProcessError:
        return


def _own_comm() -> str:
    try:
        return Path("/proc/self/comm").read_text().strip()
    except OSError:
        return "python"


def _say(message: str) -> None:
    print(f"forgehand-runner supervisor: {message}", file=sys.stderr, flush=True)
