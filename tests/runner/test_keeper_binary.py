"""The compiled keeper (``keeper.c``), spoken to directly over its socket.

No daemon: a small client speaks the frame protocol (``u8 kind | u32 id | u32 length``),
starts runs with ``KeeperStart`` and reads their journals back with the Python reader, so
each test checks the binary against the formats the daemon relies on. Supervise mode runs
a small Python script as the "daemon".

"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner.journal import (
    JournalReader,
    journal_bytes,
    parse_event,
    read_exit_record,
    read_truncations,
)
from forgehand.runner.keeper_client import keeper_pid
from forgehand.runner.keeper_launch import KEEPER_COMM, keeper_binary

FRAME = struct.Struct("<BII")
WAIT = 30.0  # how long to wait for something that must happen (generous: a busy machine)
JOURNAL_MAX = 64 * 1024 * 1024
PATH = "/usr/local/bin:/usr/bin:/bin"
TOO_BIG = "an event exceeded the journal's record size: the run was stopped"


@pytest.fixture(scope="module")
def keeper_bin() -> Path:
    """The binary every runner uses, as ``scripts/build-keeper`` (which ``scripts/test``
    runs) built it from the current source."""
    binary, source = keeper_binary(), keeper_binary().with_name("keeper.c")
    assert os.access(binary, os.X_OK), f"{binary} is not built: run scripts/build-keeper"
    stale = source.stat().st_mtime > binary.stat().st_mtime
    assert not stale, f"{binary} is older than {source}: run scripts/build-keeper"
    return binary


def wait_for(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


class Client:
    """One connection to a keeper: requests and their replies; notifications on the side."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(str(path))
        self.next_id = 1
        self.notes: list[str] = []
        self.pending = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, kind: str, ident: int, payload: bytes = b"") -> None:
        self.sock.sendall(FRAME.pack(ord(kind), ident, len(payload)) + payload)

    def _recv_exactly(self, size: int) -> bytes:
        while len(self.pending) < size:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the keeper closed the connection")
            self.pending += chunk
        data, self.pending = self.pending[:size], self.pending[size:]
        return data

    def frame(self) -> tuple[str, int, bytes]:
        kind, ident, length = FRAME.unpack(self._recv_exactly(FRAME.size))
        payload = self._recv_exactly(length)
        if ident == 0:
            assert kind == ord("N")
            self.notes += payload.decode().split("\n")
        return chr(kind), ident, payload

    def request(self, kind: str, payload: bytes = b"") -> tuple[str, bytes]:
        ident = self.next_id
        self.next_id += 1
        self.send(kind, ident, payload)
        while True:
            got, got_id, body = self.frame()
            if got_id == ident:
                return got, body
            assert got_id == 0, f"a reply to {got_id} while waiting for {ident}"

    def wait_note(self, line: str) -> None:
        while line not in self.notes:
            self.frame()


@dataclass
class Keeper:
    """A keeper's state dir, its clients, and the runs started (killed at the end)."""

    binary: Path
    base: Path
    clients: list[Client] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)

    @property
    def state(self) -> Path:
        return self.base / "state"

    def serve(self, *extra: str) -> bytes:
        """Run ``serve``; what it answered on stdout (it detaches at once)."""
        options = ["--journal-max-bytes", str(JOURNAL_MAX), *extra]
        with (self.base / "keeper.log").open("ab") as log:
            done = subprocess.run(
                [str(self.binary), "serve", "--state-dir", str(self.state), *options],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                timeout=WAIT,
                check=True,
            )
        return done.stdout

    def connect(self) -> Client:
        client = Client(self.state / "keeper.sock")
        self.clients.append(client)
        return client

    def start(self, client: Client, run_id: str, argv: list[str], **fields: object) -> bytes:
        """Start a run; the reply's payload (its pid, or "0"). Raises on an X reply."""
        kind, payload = self.try_start(client, run_id, argv, **fields)
        assert kind == "O", payload
        return payload

    def try_start(
        self, client: Client, run_id: str, argv: list[str], **fields: object
    ) -> tuple[str, bytes]:
        fields.setdefault("env", [f"PATH={PATH}"])
        request = f"the request of {run_id}".encode()
        start = pb.KeeperStart(run_id=run_id, request=request, argv=argv, **fields)  # type: ignore[arg-type]
        return self.start_raw(client, start.SerializeToString())

    def start_raw(self, client: Client, payload: bytes) -> tuple[str, bytes]:
        kind, body = client.request("S", payload)
        if kind == "O" and body != b"0":
            self.pids.append(int(body))
        return kind, body

    def journal(self, run_id: str) -> Path:
        return self.state / "runs" / run_id / "journal"

    def events(self, run_id: str) -> list[pb.Event]:
        reader = JournalReader(self.journal(run_id), 0)
        try:
            return [parse_event(payload) for _, payload in reader.read(1 << 30)]
        finally:
            reader.close()

    def run(self, client: Client, run_id: str, argv: list[str], **fields: object) -> list[pb.Event]:
        """Start a run, wait until it has ended, return its journal."""
        self.start(client, run_id, argv, **fields)
        client.wait_note("!" + run_id)
        return self.events(run_id)

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        pid = keeper_pid(self.state)
        if pid:
            os.kill(pid, signal.SIGKILL)
        for run_pid in self.pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(run_pid, signal.SIGKILL)


@pytest.fixture
def keeper(keeper_bin: Path, short_tmp: Path) -> Iterator[Keeper]:
    """A serving keeper on a fresh state dir."""
    (short_tmp / "state" / "runs").mkdir(parents=True)
    running = Keeper(keeper_bin, short_tmp)
    try:
        assert running.serve() == b"ready\n"
        yield running
    finally:
        running.stop()


def output(events: list[pb.Event], stream: int | None = None) -> bytes:
    return b"".join(
        e.output.data for e in events if e.HasField("output") and stream in (None, e.output.stream)
    )


def exited(events: list[pb.Event]) -> pb.Exited:
    assert events[-1].HasField("exited"), events[-1]
    return events[-1].exited


# -- runs ------------------------------------------------------------------------------------


def test_a_run_is_started_records_its_output_and_exits(keeper: Keeper) -> None:
    client = keeper.connect()
    script = "echo out; echo err >&2; exit 3"
    pid = keeper.start(client, "run-1", ["sh", "-c", script])
    client.wait_note("!run-1")
    events = keeper.events("run-1")

    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].started.pid == int(pid)
    assert events[0].started.started_unix_ns > 0
    assert output(events, pb.STREAM_STDOUT) == b"out\n"
    assert output(events, pb.STREAM_STDERR) == b"err\n"
    end = exited(events)
    assert (end.code, end.signal, end.reason, end.message) == (3, 0, pb.EXIT_REASON_EXITED, "")
    assert end.duration_seconds > 0
    assert end.HasField("rusage")
    assert end.rusage.max_rss_bytes > 0
    assert read_exit_record(keeper.journal("run-1")) == events[-1]
    reader = JournalReader(keeper.journal("run-1"), 0)
    for _, payload in reader.read(1 << 20):  # encoded by hand, as protobuf encodes them
        assert parse_event(payload).SerializeToString() == bytes(payload)
    reader.close()
    assert (keeper.state / "runs" / "run-1" / "request.pb").read_bytes() == b"the request of run-1"
    pid_of_keeper = keeper_pid(keeper.state)
    assert Path(f"/proc/{pid_of_keeper}/comm").read_text().strip() == KEEPER_COMM


def test_path_lookup_skips_directories_and_a_relative_argv0_runs_in_cwd(keeper: Keeper) -> None:
    first, second = keeper.base / "first", keeper.base / "second"
    (first / "tool").mkdir(parents=True)  # a directory of that name is not the command
    second.mkdir()
    (second / "tool").write_text("#!/bin/sh\necho found\n")
    (second / "tool").chmod(0o755)
    client = keeper.connect()

    events = keeper.run(client, "look", ["tool"], env=[f"PATH=:{first}:{second}"])
    assert output(events) == b"found\n"

    events = keeper.run(client, "rel", ["./tool"], cwd=str(second))
    assert output(events) == b"found\n"
    assert exited(events).code == 0


def test_stdin_is_fed_and_closed(keeper: Keeper) -> None:
    client = keeper.connect()
    keeper.start(client, "cat", ["cat"], stdin_pipe=True)
    assert client.request("I", b"cat\0\0hello ") == ("O", b"")
    assert client.request("I", b"cat\0\x01world") == ("O", b"")
    client.wait_note("!cat")
    assert output(keeper.events("cat")) == b"hello world"
    assert client.request("I", b"cat\0\0more") == ("X", b"run 'cat' has already ended")


def test_initial_stdin_bytes_are_written_and_closed(keeper: Keeper) -> None:
    client = keeper.connect()
    events = keeper.run(client, "fed", ["cat"], stdin=b"from the request", stdin_close=True)
    assert output(events) == b"from the request"
    assert exited(events).code == 0


def test_a_run_without_stdin_pipe_refuses_stdin(keeper: Keeper) -> None:
    client = keeper.connect()
    keeper.start(client, "nostdin", ["sh", "-c", "cat; echo eof; exec sleep 30"])
    wait_for(lambda: b"eof" in output(keeper.events("nostdin")), "cat to read /dev/null")
    kind, message = client.request("I", b"nostdin\0\0data")
    assert (kind, message) == ("X", b"the run was started without stdin: start it with stdin=pipe")
    assert client.request("C", b"nostdin\0" + struct.pack("<d", 0)) == ("O", b"1")
    client.wait_note("!nostdin")


def test_stdin_larger_than_the_pipe_is_written_as_the_run_reads(keeper: Keeper) -> None:
    client = keeper.connect()
    keeper.start(client, "big", ["wc", "-c"], stdin_pipe=True)
    data = os.urandom(3 * 1024 * 1024)  # more than the pipe holds: the keeper waits for room
    assert client.request("I", b"big\0\x01" + data) == ("O", b"")
    client.wait_note("!big")
    assert output(keeper.events("big")).strip() == str(len(data)).encode()


def test_terminal_input_larger_than_its_buffer_is_written_as_the_run_reads(
    keeper: Keeper,
) -> None:
    """A paste into a terminal can exceed what the terminal holds (4 KiB a line, a few KiB
    in all): the rest must follow as the run reads, not wait for the next request."""
    client = keeper.connect()
    script = "stty raw -echo; echo ready; head -c 200001 | od -c | tail -3"
    keeper.start(client, "paste", ["sh", "-c", script], pty=True)
    ready = lambda: b"ready" in output(keeper.events("paste"), pb.STREAM_PTY)  # noqa: E731
    wait_for(ready, "the terminal to be set up")
    # With eof, a ^D follows the data (raw mode passes it on as a byte).
    assert client.request("I", b"paste\0\x01" + b"x" * 200000) == ("O", b"")
    client.wait_note("!paste")
    events = keeper.events("paste")
    # od, offsets in octal: the byte at 200000 is the ^D, and 200001 bytes came in all.
    assert b"0606500 004\n0606501" in output(events, pb.STREAM_PTY)
    assert exited(events).code == 0


def test_a_terminal_gets_its_size_resizes_and_input(keeper: Keeper) -> None:
    client = keeper.connect()
    script = 'stty size; read line; stty size; echo "got $line"'
    keeper.start(client, "tty", ["sh", "-c", script], pty=True, pty_rows=30, pty_cols=100)
    wait_for(lambda: b"30 100" in output(keeper.events("tty")), "the first size")
    assert client.request("R", b"tty\0" + struct.pack("<HH", 40, 120)) == ("O", b"")
    assert client.request("I", b"tty\0\0hi\n") == ("O", b"")
    client.wait_note("!tty")
    events = keeper.events("tty")
    text = output(events, pb.STREAM_PTY)
    assert b"40 120" in text
    assert b"got hi" in text
    assert exited(events).code == 0
    kind, message = client.request("R", b"nope\0" + struct.pack("<HH", 1, 1))
    assert (kind, message) == ("X", b"run 'nope' has already ended")


def test_resize_of_a_run_without_terminal_is_refused(keeper: Keeper) -> None:
    client = keeper.connect()
    keeper.start(client, "pipes", ["sleep", "30"])
    kind, message = client.request("R", b"pipes\0" + struct.pack("<HH", 40, 120))
    assert (kind, message) == ("X", b"the run has no terminal: start it with pty=true")
    client.request("C", b"pipes\0" + struct.pack("<d", 0))
    client.wait_note("!pipes")


def test_a_timeout_ends_the_run(keeper: Keeper) -> None:
    client = keeper.connect()
    events = keeper.run(client, "slow", ["sleep", "30"], timeout_seconds=0.3)
    end = exited(events)
    assert end.reason == pb.EXIT_REASON_TIMEOUT
    assert end.message == "timed out after 0.3s"
    assert (end.code, end.signal) == (-1, signal.SIGTERM)


def test_cancel_sends_term_then_kill_after_the_grace(keeper: Keeper) -> None:
    client = keeper.connect()
    script = "trap 'echo term' TERM; echo ready; while :; do sleep 0.05; done"
    keeper.start(client, "stubborn", ["sh", "-c", script])
    wait_for(lambda: b"ready" in output(keeper.events("stubborn")), "the trap")
    assert client.request("C", b"stubborn\0" + struct.pack("<d", 0.5)) == ("O", b"1")
    client.wait_note("!stubborn")
    events = keeper.events("stubborn")
    assert b"term" in output(events)
    end = exited(events)
    assert (end.reason, end.message, end.signal) == (
        pb.EXIT_REASON_CANCELLED,
        "cancelled",
        signal.SIGKILL,
    )
    assert client.request("C", b"stubborn\0" + struct.pack("<d", 0.5)) == ("O", b"0")


def test_the_output_limit_cuts_the_output_and_stops_the_run(keeper: Keeper) -> None:
    client = keeper.connect()
    script = "head -c 300000 /dev/zero; exec sleep 30"
    events = keeper.run(
        client, "chatty", ["sh", "-c", script], max_output_bytes=100000, cancel_grace_seconds=5
    )
    assert len(output(events)) == 100000
    end = exited(events)
    assert (end.reason, end.message) == (pb.EXIT_REASON_LIMIT, "output exceeded 100000 bytes")
    assert end.signal == signal.SIGTERM


@pytest.mark.parametrize(
    ("argv", "fields", "message"),
    [
        (
            ["no-such-command"],
            {"env": ["PATH=/nonexistent"]},
            "command not found: 'no-such-command' (looked in PATH=/nonexistent)",
        ),
        (
            ["no-such-command"],
            {"env": []},
            f"command not found: 'no-such-command' (looked in PATH={PATH})",
        ),
        (
            ["/bin/true"],
            {"cwd": "/nonexistent-dir"},
            "cannot start '/bin/true': No such file or directory",
        ),
    ],
)
def test_a_command_that_cannot_start_ends_with_error_127(
    keeper: Keeper, argv: list[str], fields: dict[str, object], message: str
) -> None:
    client = keeper.connect()
    assert keeper.start(client, "bad", argv, **fields) == b"0"
    client.wait_note("!bad")
    events = keeper.events("bad")
    assert not events[0].HasField("started")
    assert output(events, pb.STREAM_STDERR) == f"forgehand-runner: {message}\n".encode()
    end = exited(events)
    assert (end.code, end.reason, end.message) == (127, pb.EXIT_REASON_ERROR, message)
    assert not end.HasField("rusage")


@pytest.mark.parametrize(
    ("mode", "content", "error"),
    [(0o644, "echo hi\n", "Permission denied"), (0o755, "\x7fELF junk", "Exec format error")],
)
def test_a_file_that_cannot_be_executed_ends_with_error_127(
    keeper: Keeper, mode: int, content: str, error: str
) -> None:
    program = keeper.base / "program"
    program.write_text(content)
    program.chmod(mode)
    client = keeper.connect()
    assert keeper.start(client, "noexec", [str(program)]) == b"0"
    client.wait_note("!noexec")
    end = exited(keeper.events("noexec"))
    assert (end.code, end.reason) == (127, pb.EXIT_REASON_ERROR)
    assert end.message == f"cannot start '{program}': {error}"


def test_output_held_open_by_an_escaped_process_is_drained_then_closed(keeper: Keeper) -> None:
    pid_file = keeper.base / "escaped.pid"
    script = (
        f"setsid sh -c 'echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; exec sleep 30' &"
        f" while [ ! -e {pid_file} ]; do sleep 0.01; done; echo bye"
    )
    client = keeper.connect()
    try:
        events = keeper.run(client, "escape", ["sh", "-c", script])
    finally:
        wait_for(pid_file.exists, "the escaped process")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert output(events) == b"bye\n"
    assert exited(events).code == 0


STRUCK = "after the out-of-memory killer struck in the sandbox while it ran"


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("kill -9 $$", "killed by the out-of-memory killer"),
        ("exit 1", f"exited with status 1 {STRUCK}"),
        ("kill -15 $$", f"killed by SIGTERM {STRUCK}"),
    ],
)
def test_a_run_that_fails_after_an_oom_kill_ends_with_oom(
    keeper_bin: Path, short_tmp: Path, script: str, message: str
) -> None:
    (short_tmp / "state" / "runs").mkdir(parents=True)
    events_file = short_tmp / "memory.events"
    events_file.write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    keeper = Keeper(keeper_bin, short_tmp)
    try:
        assert keeper.serve("--memory-events", str(events_file)) == b"ready\n"
        client = keeper.connect()
        events = keeper.run(client, "fine", ["true"])
        assert exited(events).reason == pb.EXIT_REASON_EXITED  # a success is never OOM
        keeper.start(client, "victim", ["sh", "-c", f"read x; {script}"], stdin_pipe=True)
        events_file.write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n")
        assert client.request("I", b"victim\0\x01") == ("O", b"")
        client.wait_note("!victim")
        end = exited(keeper.events("victim"))
        assert (end.reason, end.message) == (pb.EXIT_REASON_OOM, message)
    finally:
        keeper.stop()


@pytest.mark.parametrize(
    ("number", "name"), [(signal.SIGKILL, "SIGKILL"), (signal.SIGRTMIN + 2, "SIGRTMIN+2")]
)
def test_a_run_killed_by_a_signal(keeper: Keeper, number: int, name: str) -> None:
    client = keeper.connect()
    code = f"import os; os.kill(os.getpid(), {int(number)})"
    events = keeper.run(client, "shot", [sys.executable, "-I", "-S", "-c", code])
    end = exited(events)
    assert (end.code, end.signal) == (-1, number)
    assert (end.reason, end.message) == (pb.EXIT_REASON_SIGNALLED, f"killed by signal {name}")


def test_the_journal_stays_bounded_and_records_what_it_dropped(keeper: Keeper) -> None:
    client = keeper.connect()
    cap, total = 256 * 1024, 3_000_000
    events = keeper.run(
        client, "flood", ["head", "-c", str(total), "/dev/zero"], journal_max_bytes=cap
    )
    truncations = read_truncations(keeper.journal("flood"))
    assert truncations
    gaps = [e.truncated for e in events if e.HasField("truncated")]
    assert gaps
    assert len(output(events)) + sum(gap.bytes for gap in gaps) == total
    assert exited(events).code == 0
    segment = 64 * 1024  # the smallest segment, for a cap this small
    assert journal_bytes(keeper.journal("flood")) < cap + 3 * segment


def step_frame(message: bytes) -> bytes:
    return struct.pack("<I", len(message)) + message


def test_a_journal_write_that_fails_stops_that_run_only(keeper: Keeper) -> None:
    """A journal the disk refuses (here a file size limit on the keeper, which must not
    kill it with SIGXFSZ: the write comes up short) ends the run with its reason; the
    keeper and its other runs go on."""
    client = keeper.connect()
    keeper.start(client, "calm", ["sh", "-c", "read line; echo calm $line"], stdin_pipe=True)
    pid = keeper_pid(keeper.state)
    subprocess.run(["prlimit", f"--pid={pid}", "--fsize=2000000:unlimited"], check=True)
    try:
        events = keeper.run(client, "flood", ["head", "-c", "20000000", "/dev/zero"])
    finally:
        subprocess.run(["prlimit", f"--pid={pid}", "--fsize=unlimited:unlimited"], check=True)
    end = exited(events)
    assert end.reason == pb.EXIT_REASON_ERROR
    assert end.message == "journal disk full: the run was stopped"
    assert keeper_pid(keeper.state) == pid
    assert client.request("I", b"calm\0\x01still") == ("O", b"")
    client.wait_note("!calm")
    assert output(keeper.events("calm")) == b"calm still\n"


def test_step_event_frames_become_events_and_invalid_ones_are_dropped(keeper: Keeper) -> None:
    valid = [
        pb.StepEvent(kind=pb.StepEvent.KIND_STARTED, path=["build", "compile"]),
        pb.StepEvent(
            kind=pb.StepEvent.KIND_FINISHED,
            path=["build"],
            status="failed",
            outputs_json='{"a": 1}',
            exit_code=-3,
            error="boom",
        ),
        pb.StepEvent(kind=pb.StepEvent.KIND_RESULT, result_json='{"ok": true}'),
    ]
    invalid = [
        b"\x12\x01\xff",  # a path that is not UTF-8
        b"\x40\x01",  # an unknown field
        b"\x0a\x00",  # kind with the wrong wire type
        b"\x12\x05ab",  # a length beyond the frame
        b"\xff\xff\xff",  # garbage
    ]
    first, second, result = (event.SerializeToString() for event in valid)
    frames = [first, *invalid[:3], second, *invalid[3:], result]
    client = keeper.connect()
    events = keeper.run(
        client,
        "steps",
        ["sh", "-c", "cat >&3"],
        stdin=b"".join(step_frame(f) for f in frames),
        stdin_close=True,
        step_events=True,
    )
    assert [e.step for e in events if e.HasField("step")] == valid
    assert exited(events).code == 0
    assert client.request("L") == ("O", b"")


def test_a_step_event_too_large_for_a_record_stops_the_run(keeper: Keeper) -> None:
    client = keeper.connect()
    script = r"printf '\377\377\377\177' >&3; exec sleep 30"
    events = keeper.run(client, "huge", ["sh", "-c", script], step_events=True)
    end = exited(events)
    assert (end.reason, end.message) == (pb.EXIT_REASON_ERROR, TOO_BIG)


# -- the protocol ----------------------------------------------------------------------------


def unknown_fields() -> bytes:
    """Field 100 once in every wire type, a group included: skipped."""
    return bytes.fromhex("a006 01 a106 0102030405060708 a206 02abcd a506 01020304 a306 a00601 a406")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x0a\x05ab", "malformed KeeperStart: a length beyond the end"),
        (b"\x08\x01", "malformed KeeperStart: a field with the wrong wire type"),
        (b"\x80", "malformed KeeperStart: a truncated varint"),
        (b"\x0f", "malformed KeeperStart: a field with the wrong wire type"),
        (b"\xf8\xff\xff\xff\xff\xff\x01", "malformed KeeperStart: an invalid field number"),
        (b"\x0a\x01x\x1a\x01\xff", "malformed KeeperStart: a string that is not UTF-8"),
        (
            pb.KeeperStart(run_id="../evil", argv=["true"]).SerializeToString(),
            "invalid run_id '../evil': it must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}",
        ),
        (
            pb.KeeperStart(run_id="x" * 129, argv=["true"]).SerializeToString(),
            f"invalid run_id '{'x' * 129}': it must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}",
        ),
        (pb.KeeperStart(run_id="ok").SerializeToString(), "argv is empty"),
        (
            pb.KeeperStart(run_id="ok", argv=["a\0b"]).SerializeToString(),
            "argv holds a NUL character",
        ),
        (
            pb.KeeperStart(run_id="ok", argv=["true"], env=["NOEQUALS"]).SerializeToString(),
            "env entry 'NOEQUALS' has no '='",
        ),
    ],
)
def test_a_bad_start_request_is_refused_and_the_keeper_serves_on(
    keeper: Keeper, payload: bytes, message: str
) -> None:
    client = keeper.connect()
    assert keeper.start_raw(client, payload) == ("X", f"keeper failed: {message}".encode())
    assert client.request("L") == ("O", b"")
    assert not (keeper.state / "runs" / "ok").exists()


def test_unknown_fields_are_skipped(keeper: Keeper) -> None:
    client = keeper.connect()
    start = pb.KeeperStart(run_id="extra", argv=["echo", "hi"], env=[f"PATH={PATH}"])
    kind, _ = keeper.start_raw(client, start.SerializeToString() + unknown_fields())
    assert kind == "O"
    client.wait_note("!extra")
    assert output(keeper.events("extra")) == b"hi\n"


def test_a_live_run_id_is_refused_and_live_lists_runs(keeper: Keeper) -> None:
    client = keeper.connect()
    keeper.start(client, "b-second", ["sleep", "30"])
    keeper.start(client, "a-first", ["sleep", "30"])
    kind, message = keeper.try_start(client, "a-first", ["true"])
    assert (kind, message) == (
        "X",
        b"keeper failed: run 'a-first' is still live: choose another run_id",
    )
    assert client.request("L") == ("O", b"b-second\na-first")
    for run_id in (b"b-second", b"a-first"):
        assert client.request("C", run_id + b"\0" + struct.pack("<d", 0)) == ("O", b"1")
    client.wait_note("!a-first")
    client.wait_note("!b-second")
    assert client.request("L") == ("O", b"")


@pytest.mark.parametrize("kind", [ord("Z"), 1, ord("'"), 0x80, 0xE9, 0xAD])
def test_an_unknown_request_is_refused(keeper: Keeper, kind: int) -> None:
    client = keeper.connect()
    client.send(chr(kind), 7)
    assert client.frame() == ("X", 7, f"unknown request {chr(kind)!r}".encode())


def test_an_oversized_frame_drops_its_connection_only(keeper: Keeper) -> None:
    client = keeper.connect()
    client.sock.sendall(FRAME.pack(ord("I"), 1, 64 * 1024 * 1024 + 1))
    with pytest.raises(ConnectionError):
        client.frame()
    assert keeper.connect().request("L") == ("O", b"")


def test_notifications_tell_of_output_and_of_the_end(keeper: Keeper) -> None:
    client = keeper.connect()
    watcher = keeper.connect()
    assert watcher.request("L") == ("O", b"")  # connected before the run starts
    keeper.start(client, "news", ["sh", "-c", "echo one; read x"], stdin_pipe=True)
    watcher.wait_note("news")
    assert client.request("I", b"news\0\x01") == ("O", b"")
    watcher.wait_note("!news")
    client.wait_note("!news")


def test_a_second_keeper_on_the_same_state_dir_answers_busy(keeper: Keeper) -> None:
    pid = keeper_pid(keeper.state)
    assert keeper.serve() == b"busy\n"
    assert keeper_pid(keeper.state) == pid


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["serve"],
        ["serve", "--state-dir", "/tmp"],
        ["serve", "--state-dir", "/tmp", "--journal-max-bytes", "lots"],
        ["serve", "--state-dir", "/tmp", "--journal-max-bytes", "1", "--bogus", "x"],
        ["supervise", "--state-dir", "/tmp", "--journal-max-bytes", "1"],
        ["supervise", "--state-dir", "/tmp", "--journal-max-bytes", "1", "--"],
    ],
)
def test_a_bad_command_line_exits_2_with_usage(keeper_bin: Path, argv: list[str]) -> None:
    done = subprocess.run([str(keeper_bin), *argv], capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: forgehand-keeper")


# -- supervise mode --------------------------------------------------------------------------

DAEMON = """
import json, os, signal, sys, time
log, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
def note(entry):
    with open(log, "a") as out:
        out.write(json.dumps(entry) + "\\n")
def on_term(*_):
    note("term")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
note({"pid": os.getpid(), "args": args})
if "--ready-fd" in args:
    fd = int(args[args.index("--ready-fd") + 1])
    os.write(fd, b"ready")
    os.close(fd)
if mode != "sleep":
    sys.exit(int(mode))
while True:
    time.sleep(1)
"""


@dataclass
class Supervised:
    """A ``supervise`` keeper and its daemon's log."""

    process: subprocess.Popen[bytes]
    base: Path
    ready: bytes

    @property
    def log(self) -> list[object]:
        path = self.base / "daemon.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines]

    def starts(self) -> list[dict[str, object]]:
        return [entry for entry in self.log if isinstance(entry, dict)]

    def wait(self) -> tuple[int, str]:
        code = self.process.wait(timeout=WAIT)
        return code, (self.base / "supervisor.err").read_text()


def read_until_eof(fd: int) -> bytes:
    data = b""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and select.select([fd], [], [], WAIT)[0]:
        chunk = os.read(fd, 64)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def supervise(keeper_bin: Path, short_tmp: Path) -> Iterator[Callable[..., Supervised]]:
    started: list[Supervised] = []
    (short_tmp / "state" / "runs").mkdir(parents=True)  # as the daemon makes it
    script = short_tmp / "daemon.py"
    script.write_text(DAEMON)

    def start(mode: str = "sleep", *options: str, daemon: list[str] | None = None) -> Supervised:
        read_end, write_end = os.pipe()
        argv = [str(keeper_bin), "supervise", "--state-dir", str(short_tmp / "state")]
        argv += ["--journal-max-bytes", str(JOURNAL_MAX), "--ready-fd", str(write_end)]
        argv += [*options, "--"]
        argv += daemon or [sys.executable, "-I", str(script), str(short_tmp / "daemon.log"), mode]
        with (short_tmp / "supervisor.err").open("ab") as err:
            process = subprocess.Popen(
                argv, pass_fds=(write_end,), stdin=subprocess.DEVNULL, stderr=err
            )
        os.close(write_end)
        try:
            ready = read_until_eof(read_end)
        finally:
            os.close(read_end)
        running = Supervised(process, short_tmp, ready)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()
        for entry in running.starts():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry["pid"]), signal.SIGKILL)  # type: ignore[call-overload]


def test_supervise_restarts_a_killed_daemon_and_stops_on_sigterm(
    supervise: Callable[..., Supervised], short_tmp: Path
) -> None:
    socket_path = short_tmp / "daemon.sock"
    running = supervise("sleep", "--socket", str(socket_path))
    assert running.ready == b"ready"
    first = running.starts()[0]
    assert first["args"][-2:] == ["--ready-fd", first["args"][-1]]  # type: ignore[index]
    pid = running.process.pid
    assert Path(f"/proc/{pid}/comm").read_text().strip() == KEEPER_COMM
    assert keeper_pid(short_tmp / "state") == pid

    socket_path.touch()  # as if the daemon had bound it
    os.kill(int(first["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    wait_for(lambda: len(running.starts()) == 2, "the restarted daemon")
    assert running.starts()[1]["args"] == []
    assert not socket_path.exists()

    keeper = Keeper(Path("unused"), short_tmp)  # the supervisor is the keeper: talk to it
    try:
        run_pid = int(keeper.start(keeper.connect(), "kept", ["sleep", "30"]))
        running.process.send_signal(signal.SIGTERM)
        code, err = running.wait()
    finally:
        keeper.stop()
    assert code == 0
    assert "forgehand-runner supervisor: the daemon was killed by SIGKILL: restarting it" in err
    assert "forgehand-runner supervisor: stopping on SIGTERM" in err
    assert "term" in running.log  # the daemon got SIGTERM
    state = Path(f"/proc/{run_pid}/stat")
    wait_for(lambda: not state.exists() or state.read_text().split()[2] == "Z", "the run's end")


def test_supervise_stops_when_the_daemon_exits_0(supervise: Callable[..., Supervised]) -> None:
    running = supervise("0")
    code, err = running.wait()
    assert code == 0
    assert "forgehand-runner supervisor: the daemon exited with status 0: stopping" in err


def test_supervise_gives_up_after_max_restarts(supervise: Callable[..., Supervised]) -> None:
    running = supervise("1", "--max-restarts", "2")
    code, err = running.wait()
    assert code == 1
    assert "the daemon was exited with 1 after 2 restarts" in err
    starts = running.starts()
    assert len(starts) == 3
    assert all(start["args"] == [] for start in starts[1:])


def test_supervise_stops_with_2_when_the_daemon_cannot_run(
    supervise: Callable[..., Supervised],
) -> None:
    running = supervise(daemon=["/nonexistent/daemon"])
    code, err = running.wait()
    assert code == 2
    assert (
        "forgehand-runner supervisor: cannot run the daemon /nonexistent/daemon: "
        "No such file or directory" in err
    )
    assert "the daemon exited with status 2: stopping" in err


def test_supervise_refuses_a_busy_state_dir(
    supervise: Callable[..., Supervised], keeper_bin: Path, short_tmp: Path
) -> None:
    serving = Keeper(keeper_bin, short_tmp)
    try:
        assert serving.serve() == b"ready\n"
        running = supervise("sleep")
        code, err = running.wait()
        assert code == 2
        assert running.ready == b""
        state = short_tmp / "state"
        assert f"another keeper holds {state}: stop it or choose another --state-dir" in err
    finally:
        serving.stop()
