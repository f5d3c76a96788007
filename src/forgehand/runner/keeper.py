"""The keeper: the process that owns every run's process, pipes and journal.

Why a separate process: the daemon (gRPC, attach streams) may be killed at any moment,
even with SIGKILL, and no run may notice. The keeper runs in its own session, is started
by the first daemon on a state dir, and is found again by the next one through its socket
``<state_dir>/keeper.sock``. It is a single-threaded selector loop that starts commands
with ``posix_spawn`` (no per-run interpreter, no fork of a large process), so starting a
run costs about as much as a plain spawn.

What it does per run: spawn the command in a new session (its process group is the run's)
→ ``Started`` → pump output into the journal, feed stdin, enforce the timeout and the
output limit, obey control frames → on exit kill what is left of the process group, drain
the pipes → ``Exited``. Output from pipes is moved into the journal with ``splice``
(``JournalWriter.splice_output``): the bytes go from the pipe to the journal's page cache
without passing through the keeper. A terminal cannot be spliced, nor can some file
systems; then the keeper reads and writes. The keeper is every run's child subreaper and
reaps with ``wait4``, so every exit comes with its resource usage.

Wire protocol with the daemon, on one connection, frames ``u8 kind | u32 id | u32 length |
payload``. Requests (id > 0) get exactly one reply with the same id: ``O`` (ok, payload
depends on the request) or ``X`` (error message). Frames with id 0 are notifications: ``N``
with newline-separated run ids whose journal grew, and ``!<run id>`` for runs that ended.

    S start   payload: serialized StartRequest      → O: pid (ascii)
    I stdin   run_id NUL eof-flag-byte data          → O once the data is in the pipe (and,
                                                         with the flag, stdin is closed)
    R resize  run_id NUL u16 rows u16 cols            → O
    C cancel  run_id NUL f64 grace                    → O: "1" if it was running
    L live    (empty)                                  → O: newline-separated running run ids

The keeper exits once no daemon has been connected and no run has been running for
``IDLE_EXIT_SECONDS``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import struct
import sys
import termios
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner.journal import JournalWriter
from forgehand.runner.tuning import tune_malloc

FRAME = struct.Struct("<BII")
ENDED_MARK = "!"  # a notification line "!<run id>": that run has ended
STEP_EVENTS = -1  # the pseudo-stream of a step run's event pipe (fd 3 of the engine)
STEP_KINDS = {
    "step_started": pb.StepEvent.KIND_STARTED,
    "step_finished": pb.StepEvent.KIND_FINISHED,
    "result": pb.StepEvent.KIND_RESULT,
}
READ_BYTES = 1024 * 1024
SPLICED_STREAMS = (pb.STREAM_STDOUT, pb.STREAM_STDERR)  # pipes; not a terminal, not step events
NO_SPLICE = (errno.EINVAL, errno.ENOSYS)  # the journal's file system cannot splice
JOURNAL_ERRORS = {
    errno.ENOSPC: "journal disk full: the run was stopped",
    errno.EDQUOT: "journal disk full: the run was stopped",
    errno.EFBIG: "an event exceeded the journal's record size: the run was stopped",
}
PIPE_BYTES = 1024 * 1024
DEFAULT_GRACE = 2.0
ANNOUNCE_DELAY = 0.002
DRAIN_SECONDS = 2.0
IDLE_EXIT_SECONDS = 60.0
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NAME = 15
KEEPER_COMM = "forgehand-keep"  # at most 15 bytes
PYTHON_M_VARIABLE = "FORGEHAND_PYTHON_M"
"""In the runner's own environment, where set: the JSON list that stands for ``python -m``
in its sandbox (a custom root's, see ``forgehand.sandbox.layout``), for the step engine."""
F_SETPIPE_SZ = 1031
C_INT = struct.Struct("i")
RESET_SIGNALS = (signal.SIGPIPE, signal.SIGINT, signal.SIGCHLD, signal.SIGTERM, signal.SIGQUIT)


def encode_frame(kind: str, ident: int, payload: bytes = b"") -> bytes:
    return FRAME.pack(ord(kind), ident, len(payload)) + payload


@dataclass(frozen=True)
class KeeperSettings:
    """What the daemon tells the keeper when it starts it."""

    state_dir: str
    journal_max_bytes: int
    memory_events: str = ""
    roots: tuple[str, ...] = ()


def _set_subreaper() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def signal_name(number: int) -> str:
    """``SIGTERM``; a real-time signal, which ``signal.Signals`` lacks, as ``SIGRTMIN+6``."""
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN < number < signal.SIGRTMAX:
            return f"SIGRTMIN+{number - signal.SIGRTMIN}"
        return f"signal {number}"


def _oom_message(code: int, sig: int) -> str:
    """Why a run that failed while the sandbox's OOM counter rose ended. Not only SIGKILL
    of the run itself: the killer may pick a child of it (a compiler under ``make``), and
    the run then fails in its own way."""
    if sig == signal.SIGKILL:
        return "killed by the out-of-memory killer"
    how = f"killed by {signal_name(sig)}" if sig else f"exited with status {code}"
    return f"{how} after the out-of-memory killer struck in the sandbox while it ran"


def _oom_kills(path: str) -> int:
    """The oom_kill counter of a cgroup's memory.events (v2) or memory.oom_control (v1)."""
    if not path:
        return 0
    try:
        text = Path(path).read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


class Conn:
    """A daemon's connection: buffered input, buffered output."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()


@dataclass
class Waiter:
    conn: Conn
    ident: int


@dataclass
class Run:
    """One run's live state inside the keeper."""

    run_id: str
    request: pb.StartRequest
    journal: JournalWriter
    started: float
    pid: int = 0
    outputs: dict[int, int] = field(default_factory=dict)
    stdin_fd: int = -1
    pty_master: int = -1
    stdin_queue: bytearray = field(default_factory=bytearray)
    stdin_eof: bool = False
    stdin_waiters: list[Waiter] = field(default_factory=list)
    kill_reason: int = 0
    kill_message: str = ""
    term_at: float = 0.0
    kill_at: float = 0.0
    output_bytes: int = 0
    oom_before: int = 0
    status: tuple[int, resource.struct_rusage] | None = None
    drain_until: float = 0.0
    step_buffer: bytearray = field(default_factory=bytearray)
    announce_at: float = 0.0  # when to tell the daemon about Started, unless news comes first
    splice: bool = True  # whether pipe output may be spliced into the journal

    @property
    def exited(self) -> bool:
        return self.status is not None


class Keeper:
    def __init__(self, settings: KeeperSettings, listener: socket.socket) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir)
        self.selector = selectors.DefaultSelector()
        self.listener = listener
        self.conns: list[Conn] = []
        self.runs: dict[str, Run] = {}
        self.by_pid: dict[int, Run] = {}
        self.by_fd: dict[int, Run] = {}
        self.dirty: set[str] = set()
        self.ended: set[str] = set()
        self.idle_since = time.monotonic()
        self._may_reap = True  # whether a child may have ended since the last wait4
        # Children that are not runs (the daemon, in --supervise mode): pid → on_exit(status).
        self.children: dict[int, Callable[[int], None]] = {}
        self.stopping = False  # set to leave serve_forever at the next turn
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, self._on_accept)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_signal)

    # -- plumbing -------------------------------------------------------------------------

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def serve_forever(self) -> None:
        while not self._should_exit():
            for key, mask in self.selector.select(self._next_timeout()):
                key.data(key.fd, mask)
            if self._may_reap:
                self._reap()
            self._enforce_deadlines()
            self._finish_drained()
            self._announce_due()
            self._flush_notifications()

    def _should_exit(self) -> bool:
        if self.stopping:
            return True
        if self.conns or self.runs or self.children:
            self.idle_since = time.monotonic()
            return False
        return time.monotonic() - self.idle_since > IDLE_EXIT_SECONDS

    def _next_timeout(self) -> float:
        now = time.monotonic()
        deadlines = [now + IDLE_EXIT_SECONDS]
        for run in self.runs.values():
            deadlines += [
                d for d in (run.term_at, run.kill_at, run.drain_until, run.announce_at) if d
            ]
            timeout = run.request.timeout_seconds
            if timeout > 0 and not run.kill_reason:
                deadlines.append(run.started + timeout)
        return max(0.0, min(deadlines) - now)

    def _on_signal(self, _fd: int, _mask: int) -> None:
        self._may_reap = True  # SIGCHLD (or another signal: a spare wait4 is harmless)
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass

    def _on_accept(self, _fd: int, _mask: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        conn = Conn(sock)
        self.conns.append(conn)
        self.selector.register(sock, selectors.EVENT_READ, lambda fd, m: self._on_conn(conn, m))

    def _on_conn(self, conn: Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._send(conn, b"")
        if not mask & selectors.EVENT_READ:
            return
        try:
            data = conn.sock.recv(4 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        conn.inbuf += data
        while len(conn.inbuf) >= FRAME.size:
            kind, ident, length = FRAME.unpack_from(conn.inbuf)
            if len(conn.inbuf) < FRAME.size + length:
                break
            payload = bytes(conn.inbuf[FRAME.size : FRAME.size + length])
            del conn.inbuf[: FRAME.size + length]
            self._dispatch(conn, chr(kind), ident, payload)

    def _drop(self, conn: Conn) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        if conn in self.conns:
            self.conns.remove(conn)
        for run in self.runs.values():
            run.stdin_waiters = [w for w in run.stdin_waiters if w.conn is not conn]
        conn.sock.close()

    def _send(self, conn: Conn, frame: bytes) -> None:
        if conn not in self.conns:
            return
        was_waiting = bool(conn.outbuf)
        conn.outbuf += frame
        try:
            sent = conn.sock.send(conn.outbuf) if conn.outbuf else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(conn)
            return
        del conn.outbuf[:sent]
        if bool(conn.outbuf) != was_waiting:  # only touch epoll when write interest changes
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
            self.selector.modify(conn.sock, events, self.selector.get_key(conn.sock).data)

    def _reply(self, waiter: Waiter, error: str = "", payload: bytes = b"") -> None:
        frame = (
            encode_frame("X", waiter.ident, error.encode())
            if error
            else (encode_frame("O", waiter.ident, payload))
        )
        self._send(waiter.conn, frame)

    def _announce_due(self) -> None:
        now = time.monotonic()
        for run in self.runs.values():
            if run.announce_at and now >= run.announce_at:
                run.announce_at = 0.0
                self.dirty.add(run.run_id)

    def _flush_notifications(self) -> None:
        if not self.dirty and not self.ended:
            return
        lines = sorted(self.dirty - self.ended) + [ENDED_MARK + r for r in sorted(self.ended)]
        frame = encode_frame("N", 0, "\n".join(lines).encode())
        self.dirty.clear()
        self.ended.clear()
        for conn in list(self.conns):
            self._send(conn, frame)

    # -- requests ---------------------------------------------------------------------------

    def _dispatch(self, conn: Conn, kind: str, ident: int, payload: bytes) -> None:
        handlers: dict[str, Callable[[Waiter, bytes], None]] = {
            "S": self._start,
            "I": self._stdin,
            "R": self._resize,
            "C": self._cancel,
            "L": self._live,
        }
        handler = handlers.get(kind)
        waiter = Waiter(conn, ident)
        if handler is None:
            self._reply(waiter, f"unknown request {kind!r}")
            return
        try:
            handler(waiter, payload)
        except Exception as exc:
            self._reply(waiter, f"keeper failed: {type(exc).__name__}: {exc}")

    def _run_for(self, waiter: Waiter, run_id: str) -> Run | None:
        run = self.runs.get(run_id)
        if run is None or run.exited:
            self._reply(waiter, f"run {run_id!r} has already ended")
            return None
        return run

    def _live(self, waiter: Waiter, _payload: bytes) -> None:
        self._reply(waiter, payload="\n".join(self.runs).encode())

    def _start(self, waiter: Waiter, payload: bytes) -> None:
        request = pb.StartRequest.FromString(payload)
        run_dir = self.state_dir / "runs" / request.run_id
        _make_run_dir(run_dir, payload)
        limit = request.limits.journal_max_bytes or self.settings.journal_max_bytes
        journal = JournalWriter(run_dir / "journal", min(limit, self.settings.journal_max_bytes))
        run = Run(request.run_id, request, journal, time.monotonic())
        run.oom_before = _oom_kills(self.settings.memory_events)
        self.runs[run.run_id] = run
        failure = self._spawn(run)
        if failure is not None:
            self._spawn_failed(run, failure)
            self._reply(waiter, payload=b"0")
            return
        self.by_pid[run.pid] = run
        started = pb.Event()
        started.started.pid = run.pid
        started.started.started_unix_ns = time.time_ns()
        self._append(run, started, announce=False)
        # A short command's Started, output and exit then reach the client in one batch.
        run.announce_at = time.monotonic() + ANNOUNCE_DELAY
        self._reply(waiter, payload=str(run.pid).encode())

    def _stdin(self, waiter: Waiter, payload: bytes) -> None:
        run_id, _, rest = payload.partition(b"\0")
        run = self._run_for(waiter, run_id.decode())
        if run is None:
            return
        error = _stdin_error(run)
        if error:
            self._reply(waiter, error)
            return
        run.stdin_queue += rest[1:]
        run.stdin_eof = run.stdin_eof or rest[:1] == b"\x01"
        run.stdin_waiters.append(waiter)
        self._flush_stdin(run)

    def _resize(self, waiter: Waiter, payload: bytes) -> None:
        run_id, _, size = payload.partition(b"\0")
        run = self._run_for(waiter, run_id.decode())
        if run is None:
            return
        if run.pty_master < 0 or len(size) != 4:
            self._reply(waiter, "the run has no terminal: start it with pty=true")
            return
        rows, cols = struct.unpack("<HH", size)
        _set_winsize(run.pty_master, rows, cols)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, signal.SIGWINCH)
        self._reply(waiter)

    def _cancel(self, waiter: Waiter, payload: bytes) -> None:
        run_id, _, grace_bytes = payload.partition(b"\0")
        run = self.runs.get(run_id.decode())
        if run is None or run.exited:
            self._reply(waiter, payload=b"0")
            return
        grace = struct.unpack("<d", grace_bytes)[0] if len(grace_bytes) == 8 else DEFAULT_GRACE
        self._request_kill(run, pb.EXIT_REASON_CANCELLED, "cancelled", grace)
        self._reply(waiter, payload=b"1")

    # -- spawning ---------------------------------------------------------------------------

    def _spawn(self, run: Run) -> str | None:
        request = run.request
        argv = _argv(request)
        env = dict(request.env)
        env.setdefault("PATH", DEFAULT_PATH)
        if request.HasField("step"):
            run.stdin_queue += self._step_request(request, env)
            run.stdin_eof = True
        if request.pty:
            env.setdefault("TERM", "xterm-256color")
        executable = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env["PATH"])
        if executable is None:
            return f"command not found: {argv[0]!r} (looked in PATH={env['PATH']})"
        if "/" in executable and not os.path.isabs(executable) and request.cwd:
            executable = os.path.join(request.cwd, executable)
        try:
            if request.pty:
                run.pid = self._spawn_pty(run, executable, argv, env)
            else:
                run.pid = self._spawn_pipes(run, executable, argv, env)
        except OSError as exc:
            return f"cannot start {argv[0]!r}: {exc.strerror or exc}"
        return None

    def _step_request(self, request: pb.StartRequest, env: dict[str, str]) -> bytes:
        """The JSON request the step engine reads on its stdin."""
        step = request.step
        body = {
            "ref": step.ref,
            "inputs": json.loads(step.inputs_json or "{}"),
            "env": env,
            "work_dir": step.work_dir or request.cwd or (self.settings.roots or ("/",))[0],
            "cache_dir": step.cache_dir or str(self.state_dir / "step-cache"),
            "prefetched": bool(step.cache_dir),
            "roots": list(self.settings.roots),
        }
        return json.dumps(body).encode()

    def _spawn_pipes(self, run: Run, executable: str, argv: list[str], env: dict[str, str]) -> int:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for fd in (out_r, err_r):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_BYTES)
        step_run = run.request.HasField("step")
        in_r = -1
        if run.request.stdin == pb.STDIN_MODE_PIPE or step_run:
            in_r, run.stdin_fd = os.pipe()
            os.set_blocking(run.stdin_fd, False)
        ev_r, ev_w = os.pipe() if step_run else (-1, -1)
        actions = [
            (os.POSIX_SPAWN_DUP2, in_r, 0)
            if in_r >= 0
            else (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),  # opened by the child
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
        ]
        if step_run:
            actions.append((os.POSIX_SPAWN_DUP2, ev_w, 3))
        try:
            pid = self._posix_spawn(run, executable, argv, env, actions)
        except OSError:
            for fd in (out_r, err_r, run.stdin_fd, ev_r):
                if fd >= 0:
                    os.close(fd)
            run.stdin_fd = -1
            raise
        finally:
            for fd in (in_r, out_w, err_w, ev_w):
                if fd >= 0:
                    os.close(fd)
        self._watch_output(run, out_r, pb.STREAM_STDOUT)
        self._watch_output(run, err_r, pb.STREAM_STDERR)
        if step_run:
            self._watch_output(run, ev_r, STEP_EVENTS)
            self._flush_stdin(run)
        return pid

    def _spawn_pty(self, run: Run, executable: str, argv: list[str], env: dict[str, str]) -> int:
        master, slave = os.openpty()
        size = run.request.pty_size
        _set_winsize(slave, size.rows or 24, size.cols or 80)
        # After setsid, opening the terminal (without O_NOCTTY) makes it the controlling one.
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.ttyname(slave), os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ]
        try:
            pid = self._posix_spawn(run, executable, argv, env, actions)
        except OSError:
            os.close(master)
            raise
        finally:
            os.close(slave)
        run.pty_master = master
        self._watch_output(run, master, pb.STREAM_PTY)
        return pid

    @staticmethod
    def _posix_spawn(
        run: Run,
        executable: str,
        argv: list[str],
        env: dict[str, str],
        actions: Sequence[tuple[Any, ...]],
    ) -> int:
        cwd = run.request.cwd
        previous = os.getcwd() if cwd else ""
        if cwd:
            os.chdir(
                cwd
            )  # posix_spawn has no chdir action in Python; the keeper is single-threaded
        try:
            return os.posix_spawn(
                executable, argv, env, file_actions=actions, setsid=True, setsigdef=RESET_SIGNALS
            )
        finally:
            if cwd:
                os.chdir(previous)

    def _watch_output(self, run: Run, fd: int, stream: int) -> None:
        os.set_blocking(fd, False)
        run.outputs[fd] = stream
        self.by_fd[fd] = run
        self.selector.register(fd, selectors.EVENT_READ, self._on_output)

    def _spawn_failed(self, run: Run, message: str) -> None:
        event = pb.Event()
        event.output.stream = pb.STREAM_STDERR
        event.output.data = f"forgehand-runner: {message}\n".encode()
        self._append(run, event)
        self._write_exit(run, 127, 0, pb.EXIT_REASON_ERROR, message, None)

    # -- journal --------------------------------------------------------------------------

    def _append(self, run: Run, event: pb.Event, announce: bool = True) -> None:
        self._write(run, lambda: run.journal.append(event), announce)

    def _write(self, run: Run, append: Callable[[], int], announce: bool = True) -> None:
        try:
            append()
        except OSError as exc:
            message = JOURNAL_ERRORS.get(exc.errno or 0)
            if message is None:
                raise
            self._request_kill(run, pb.EXIT_REASON_ERROR, message, 0)
        if announce:
            run.announce_at = 0.0
            self.dirty.add(run.run_id)

    def _on_output(self, fd: int, _mask: int) -> None:
        run = self.by_fd[fd]
        if run.splice and run.outputs[fd] in SPLICED_STREAMS and self._splice_output(run, fd):
            return
        try:
            data = os.read(fd, _record_bytes(run))
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: the terminal's other side is closed
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            self._close_output(run, fd)
            return
        if run.outputs[fd] == STEP_EVENTS:
            self._record_step_events(run, data)
            return
        limit = run.request.limits.max_output_bytes
        if limit and run.output_bytes + len(data) > limit:
            data = data[: max(0, limit - run.output_bytes)]
            self._request_kill(run, pb.EXIT_REASON_LIMIT, f"output exceeded {limit} bytes")
        run.output_bytes += len(data)
        if data:
            stream = run.outputs[fd]
            self._write(run, lambda: run.journal.append_output(stream, data))

    def _splice_output(self, run: Run, fd: int) -> bool:
        """Splice what the pipe holds into the journal. False leaves it to the read path:
        at end of file (nothing to splice), where the output limit cuts, and for the rest
        of the run once the journal's file system turns out unable to splice."""
        size = min(_pipe_bytes(fd), _record_bytes(run))
        limit = run.request.limits.max_output_bytes
        if size <= 0 or (limit and run.output_bytes + size > limit):
            return False
        stream = run.outputs[fd]
        try:
            self._write(run, lambda: run.journal.splice_output(stream, fd, size))
        except OSError as exc:
            if exc.errno not in NO_SPLICE:
                raise
            run.splice = False
            return False
        run.output_bytes += size
        return True

    def _record_step_events(self, run: Run, data: bytes) -> None:
        run.step_buffer += data
        *lines, rest = run.step_buffer.split(b"\n")
        run.step_buffer = bytearray(rest)
        for line in lines:
            event = _step_event(bytes(line))
            if event is not None:
                self._append(run, event)

    def _close_output(self, run: Run, fd: int) -> None:
        self._may_reap = True  # output ends when the process does: reap it now, if it is
        self.selector.unregister(fd)
        os.close(fd)
        del run.outputs[fd]
        del self.by_fd[fd]
        if fd == run.pty_master:
            run.pty_master = -1
            self._fail_stdin(run, "the run's terminal is closed")

    # -- stdin ------------------------------------------------------------------------------

    def _flush_stdin(self, run: Run) -> None:
        fd = run.pty_master if run.request.pty else run.stdin_fd
        try:
            while run.stdin_queue and fd >= 0:
                written = os.write(fd, run.stdin_queue)
                del run.stdin_queue[:written]
        except BlockingIOError:
            self._want_writable(run, fd, True)
            return
        except OSError:
            self._fail_stdin(run, "the run's stdin is closed")
            return
        self._want_writable(run, fd, False)
        if run.stdin_eof:
            run.stdin_eof = False
            if run.request.pty and run.pty_master >= 0:
                os.write(run.pty_master, b"\x04")
            elif run.stdin_fd >= 0:
                os.close(run.stdin_fd)
                run.stdin_fd = -1
        waiters, run.stdin_waiters = run.stdin_waiters, []
        for waiter in waiters:
            self._reply(waiter)

    def _want_writable(self, run: Run, fd: int, want: bool) -> None:
        if fd < 0 or fd == run.pty_master:
            return
        registered = fd in self.selector.get_map()
        if want and not registered:
            self.selector.register(
                fd, selectors.EVENT_WRITE, lambda _fd, _m: self._flush_stdin(run)
            )
        elif not want and registered:
            self.selector.unregister(fd)

    def _fail_stdin(self, run: Run, message: str) -> None:
        if run.stdin_fd >= 0:
            self._want_writable(run, run.stdin_fd, False)
            os.close(run.stdin_fd)
            run.stdin_fd = -1
        run.stdin_queue.clear()
        waiters, run.stdin_waiters = run.stdin_waiters, []
        for waiter in waiters:
            self._reply(waiter, message)

    # -- ending -----------------------------------------------------------------------------

    def _request_kill(
        self, run: Run, reason: int, message: str, grace: float | None = None
    ) -> None:
        if not run.kill_reason:
            run.kill_reason, run.kill_message = reason, message
        if run.exited or run.pid <= 0:
            return
        if grace is None:
            grace = run.request.cancel_grace_seconds or DEFAULT_GRACE
        now = time.monotonic()
        run.term_at = now
        deadline = now + max(0.0, grace)
        run.kill_at = min(run.kill_at, deadline) if run.kill_at else deadline

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for run in self.runs.values():
            timeout = run.request.timeout_seconds
            if timeout > 0 and not run.kill_reason and now - run.started >= timeout:
                self._request_kill(run, pb.EXIT_REASON_TIMEOUT, f"timed out after {timeout:g}s")
            if run.term_at and now >= run.term_at:
                run.term_at = 0.0
                _signal_group(run, signal.SIGTERM)
                _signal_group(run, signal.SIGCONT)
            if run.kill_at and now >= run.kill_at:
                run.kill_at = 0.0
                _signal_group(run, signal.SIGKILL)

    def _reap(self) -> None:
        self._may_reap = False
        while True:
            try:
                pid, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            run = self.by_pid.pop(pid, None)
            if run is not None:
                run.status = (status, rusage)
                # The run is over: whatever is left of its process group goes too.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                run.drain_until = time.monotonic() + DRAIN_SECONDS
                self._fail_stdin(run, "the run has ended")
            elif pid in self.children:
                self.children.pop(pid)(status)

    def _finish_drained(self) -> None:
        now = time.monotonic()
        for run in [r for r in self.runs.values() if r.exited]:
            if run.outputs and now < run.drain_until:
                continue
            for fd in list(run.outputs):
                self._close_output(run, fd)
            self._finish(run)

    def _finish(self, run: Run) -> None:
        assert run.status is not None
        status, rusage = run.status
        if os.WIFSIGNALED(status):
            code, sig = -1, os.WTERMSIG(status)
        else:
            code, sig = os.waitstatus_to_exitcode(status), 0
        reason, message = self._reason(run, code, sig)
        self._write_exit(run, code, sig, reason, message, rusage)

    def _reason(self, run: Run, code: int, sig: int) -> tuple[int, str]:
        if run.kill_reason:  # we ended it (timeout, cancel, output limit), however it went
            return run.kill_reason, run.kill_message
        if (sig or code) and _oom_kills(self.settings.memory_events) > run.oom_before:
            return pb.EXIT_REASON_OOM, _oom_message(code, sig)
        if sig:
            return pb.EXIT_REASON_SIGNALLED, f"killed by signal {signal_name(sig)}"
        return pb.EXIT_REASON_EXITED, ""

    def _write_exit(
        self,
        run: Run,
        code: int,
        sig: int,
        reason: int,
        message: str,
        rusage: resource.struct_rusage | None,
    ) -> None:
        event = pb.Event()
        exited = event.exited
        exited.code, exited.signal, exited.message = code, sig, message
        exited.reason = reason  # type: ignore[assignment]
        exited.duration_seconds = time.monotonic() - run.started
        if rusage is not None:
            exited.rusage.user_seconds = rusage.ru_utime
            exited.rusage.system_seconds = rusage.ru_stime
            exited.rusage.max_rss_bytes = rusage.ru_maxrss * 1024
        run.journal.write_exit(event)
        self.ended.add(run.run_id)
        self._flush_notifications()
        run.journal.close()  # fsyncs, after the daemon has been told
        del self.runs[run.run_id]


def _make_run_dir(run_dir: Path, request: bytes) -> None:
    """A fresh directory for a run, holding its request (``request.pb``, written before the
    run is spawned, so a daemon that dies meanwhile finds the run on its restart). A
    leftover of a run closed while no daemon was up goes first."""
    if os.path.lexists(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
    os.mkdir(run_dir, 0o700)
    tmp = os.path.join(run_dir, "request.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, request)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(run_dir, "request.pb"))


def _step_event(line: bytes) -> pb.Event | None:
    """A journal event from one JSON line of the step engine (malformed lines are dropped)."""
    try:
        raw = json.loads(line)
        kind = STEP_KINDS[raw["type"]]
    except (ValueError, KeyError, TypeError):
        return None
    event = pb.Event()
    step = event.step
    step.kind = kind
    if kind == pb.StepEvent.KIND_RESULT:
        step.result_json = json.dumps(raw.get("result"))
        return event
    step.path.extend(str(part) for part in raw.get("path") or ())
    step.status = str(raw.get("status") or "")
    if raw.get("outputs") is not None:
        step.outputs_json = json.dumps(raw["outputs"])
    if isinstance(raw.get("exit_code"), int):
        step.exit_code = raw["exit_code"]
    step.error = str(raw.get("error") or "")
    return event


def _argv(request: pb.StartRequest) -> list[str]:
    if request.HasField("step"):
        return [*_python_m(), "forgehand.steps.engine"]
    if request.HasField("script"):
        return [request.script.interpreter or "/bin/sh", "-c", request.script.source]
    return list(request.argv.args)


def _python_m() -> list[str]:
    """``python -m`` for the runner's own Python programs: this interpreter, or what the
    sandbox says stands for it (``PYTHON_M_VARIABLE``)."""
    given = os.environ.get(PYTHON_M_VARIABLE, "")
    with contextlib.suppress(ValueError):
        argv = json.loads(given) if given else None
        if isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv):
            return argv
    return [sys.executable, "-m"]


def _stdin_error(run: Run) -> str:
    if run.request.pty:
        return "" if run.pty_master >= 0 else "the run's terminal is closed"
    if run.request.stdin != pb.STDIN_MODE_PIPE:
        return "the run was started without stdin: start it with stdin=pipe"
    return "" if run.stdin_fd >= 0 else "the run's stdin is closed"


def _record_bytes(run: Run) -> int:
    """The most output one journal record takes: READ_BYTES, or a segment where segments
    are smaller (a small per-run cap). The journal drops whole segments to keep under its
    cap, and a record never spans two, so a record larger than a segment would let a
    journal grow to a few times its cap."""
    return min(READ_BYTES, run.journal.segment_bytes)


def _pipe_bytes(fd: int) -> int:
    """How many bytes a pipe holds (FIONREAD)."""
    held: int = C_INT.unpack(fcntl.ioctl(fd, termios.FIONREAD, bytes(C_INT.size)))[0]
    return held


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _signal_group(run: Run, sig: int) -> None:
    if not run.exited and run.pid > 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, sig)


def keeper_socket(state_dir: Path) -> Path:
    return state_dir / "keeper.sock"


def keeper_pid(state_dir: Path) -> int:
    """The pid of the keeper of a state dir (it holds the flock on keeper.lock), or 0."""
    try:
        inode = (state_dir / "keeper.lock").stat().st_ino
        locks = Path("/proc/locks").read_text()
    except OSError:
        return 0
    for line in locks.splitlines():
        parts = line.split()
        if len(parts) > 5 and parts[5].endswith(f":{inode}") and parts[4].isdigit():
            return int(parts[4])
    return 0


def stop_keeper(state_dir: Path) -> bool:
    """Kill the keeper of a state dir now (it also exits by itself after being idle for
    IDLE_EXIT_SECONDS). Every run it still has ends as lost. Returns whether one ran."""
    pid = keeper_pid(state_dir)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return bool(pid)


def serve(settings: KeeperSettings, ready_fd: int) -> None:
    """Be the keeper of ``settings.state_dir`` in this (detached) process.

    Locks the state dir, binds the socket, writes ``ready`` to ``ready_fd`` and closes it,
    then serves until idle. If another keeper holds the lock it writes ``busy`` instead and
    returns. Both ways in — ``main`` below, and the daemon's fork before its heavy imports
    (``keeper_client.fork_keeper``) — end here (``forgehand.runner.supervisor`` is a third).
    """
    tune_malloc()
    _set_comm(KEEPER_COMM)
    listener = listen(settings)
    if listener is None:
        os.write(ready_fd, b"busy\n")
        os.close(ready_fd)
        return
    keeper = Keeper(settings, listener)
    keeper.install_signals()
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    keeper.serve_forever()


def listen(settings: KeeperSettings) -> socket.socket | None:
    """Lock the state dir (for this process's whole life), bind and listen on the keeper's
    socket and become the child subreaper; None if another keeper holds the lock."""
    state_dir = Path(settings.state_dir)
    lock = os.open(state_dir / "keeper.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return None
    path = keeper_socket(state_dir)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(16)
    _set_subreaper()
    return listener


def _set_comm(name: str) -> None:
    """Name the process (``/proc/<pid>/comm``): a keeper forked from the daemon shares its
    cmdline, and the host tells them apart by this name."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def main() -> None:
    """Entry point: ``python -m forgehand.runner.keeper SETTINGS_JSON``.

    The keeper detaches (forks; the first process exits at once, so the daemon reaps it and
    the keeper belongs to no daemon), then ``serve``s, reporting on stdout. It holds an
    exclusive lock on ``keeper.lock`` for its whole life.
    """
    settings = KeeperSettings(**json.loads(sys.argv[1]))
    if os.fork():
        os._exit(0)
    serve(settings, sys.stdout.fileno())


if __name__ == "__main__":
    main()
