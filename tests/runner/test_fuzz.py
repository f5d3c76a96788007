"""Property-based fuzzing of a live runner daemon over its unix socket.

Random bytes and structurally valid but mutated messages go to every method. After each
example the daemon must still answer, every error must be a proper status code whose message
carries no Python traceback or class path, malformed input must be INVALID_ARGUMENT, and at
the end no process the fuzzer started may be left.

Safety: a fuzzed run can only ever execute ``/bin/true`` or ``/bin/echo``. Every other
program name is a bare name without ``/`` looked up in a PATH that is an empty directory,
so it is not found. Raw bytes that happen to parse as a StartRequest naming any work are
not sent. Written paths stay inside a scratch directory even if confinement were broken.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner.keeper_client import keeper_pid

SERVICE = "/forgehand.runner.v1.Runner/"
PROTOCOL = "forgehand.runner.v1"
CALL_SECONDS = 3.0
START_SECONDS = 30.0
SETTLE_SECONDS = 10.0
SAFE_PROGRAMS = ("/bin/true", "/bin/echo")
UNARY: dict[str, type[Message]] = {
    "Capabilities": pb.CapabilitiesRequest,
    "Start": pb.StartRequest,
    "WriteStdin": pb.WriteStdinRequest,
    "ResizePty": pb.ResizePtyRequest,
    "Cancel": pb.CancelRequest,
    "Status": pb.StatusRequest,
    "List": pb.ListRequest,
    "Close": pb.CloseRequest,
    "Stat": pb.StatRequest,
    "ListDir": pb.ListDirRequest,
}
SERVER_STREAMING: dict[str, type[Message]] = {
    "Attach": pb.AttachRequest,
    "ReadFile": pb.ReadFileRequest,
}
METHODS = sorted([*UNARY, *SERVER_STREAMING, "WriteFile"])
LEAKS = (
    re.compile(r"Traceback"),
    re.compile(r'File "'),
    re.compile(r'\.py", line'),
    re.compile(r"<class '"),
    re.compile(r"\b(?:[a-z_][a-z0-9_]*\.){2,}[A-Z]\w*(?:Error|Exception)\b"),
)
# Undecodable bytes are answered by grpcio itself (UNKNOWN with the DecodeError's class
# path) or surface inside WriteFile as INTERNAL: see test_undecodable_request_is_invalid.
UNDECODABLE_TODAY = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


# -- the live daemon -------------------------------------------------------------------------


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    base: Path
    socket: Path
    state: Path
    work: Path
    empty_path: Path
    channel: grpc.Channel

    def alive(self) -> bool:
        if self.process.poll() is not None:
            return False
        answer = call(self, "Capabilities", b"")
        if answer.error is not None:
            return False
        return pb.CapabilitiesResponse.FromString(answer.replies[0]).protocol == PROTOCOL


@dataclass
class Answer:
    replies: list[bytes]
    error: grpc.RpcError | None


def call(daemon: Daemon, method: str, payload: bytes | list[bytes]) -> Answer:
    """One call with identity serializers; payload is a list of messages for WriteFile."""
    path = SERVICE + method
    replies: list[bytes] = []
    try:
        if method == "WriteFile":
            assert isinstance(payload, list)
            stub = daemon.channel.stream_unary(path, None, None)
            replies.append(stub(iter(payload), timeout=CALL_SECONDS))
        elif method in SERVER_STREAMING:
            assert isinstance(payload, bytes)
            stream = daemon.channel.unary_stream(path, None, None)
            replies.extend(stream(payload, timeout=CALL_SECONDS))
        else:
            assert isinstance(payload, bytes)
            unary = daemon.channel.unary_unary(path, None, None)
            replies.append(unary(payload, timeout=CALL_SECONDS))
    except grpc.RpcError as exc:
        return Answer(replies, exc)
    return Answer(replies, None)


def lock_holder(lock: Path) -> int:
    """The pid holding the keeper's flock (0 if none)."""
    return keeper_pid(lock.parent)


def children(pid: int) -> list[int]:
    """Processes whose parent is pid (the keeper is the subreaper of every run)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry.name))
    return found


def wait_until(check: Callable[[], bool], seconds: float = SETTLE_SECONDS) -> bool:
    """Whether check() becomes true within seconds (for state that gives no event)."""
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    base = Path(tempfile.mkdtemp(prefix="fh-fuzz-", dir="/tmp"))
    # work sits three levels down, so `..` escapes still land inside base.
    work, state, empty = base / "a" / "b" / "c" / "work", base / "state", base / "empty-path"
    for directory in (work, state, empty):
        directory.mkdir(parents=True)
    socket = base / "runner.sock"
    argv = [sys.executable, "-m", "forgehand.runner.cli", "serve", "--socket", str(socket)]
    argv += ["--state-dir", str(state), "--root", str(work), "--log-level", "CRITICAL"]
    stderr = (base / "daemon.log").open("wb")
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=stderr)
    channel = grpc.insecure_channel(f"unix:{socket}")
    daemon = Daemon(process, base, socket, state, work, empty, channel)
    try:
        grpc.channel_ready_future(channel).result(timeout=START_SECONDS)
        yield daemon
    finally:
        channel.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        stderr.close()
        keeper = lock_holder(state / "keeper.lock")
        if keeper:
            os.kill(keeper, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


def outside_snapshot(daemon: Daemon) -> set[str]:
    """Paths under the scratch dir but outside the root (state and logs excluded)."""
    skip = (daemon.work, daemon.state)
    return {
        str(p)
        for p in daemon.base.rglob("*")
        if not any(p == s or p.is_relative_to(s) for s in skip) and p.name != "daemon.log"
    }


# -- invariants ------------------------------------------------------------------------------


def check_error(error: grpc.RpcError | None) -> None:
    if error is None:
        return
    assert isinstance(error, grpc.Call)
    code, details = error.code(), error.details() or ""
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (code, details)
    assert code != grpc.StatusCode.OK
    for leak in LEAKS:
        assert not leak.search(details), (code, details)


def check_answer(daemon: Daemon, answer: Answer, malformed: bool) -> None:
    check_error(answer.error)
    if malformed:
        assert answer.error is not None, "malformed request accepted"
        assert isinstance(answer.error, grpc.Call)
        assert answer.error.code() == grpc.StatusCode.INVALID_ARGUMENT, answer.error.details()
    assert daemon.alive(), "the daemon stopped answering"


def check_no_leftovers(daemon: Daemon) -> None:
    """Cancel whatever still runs; then every run has exited and the keeper has no child."""
    listing = pb.ListResponse.FromString(call(daemon, "List", b"").replies[0])
    for run in listing.runs:
        if run.state == pb.RUN_STATE_RUNNING:
            cancel = pb.CancelRequest(run_id=run.run_id, grace_seconds=0.1)
            check_error(call(daemon, "Cancel", cancel.SerializeToString()).error)

    def all_exited() -> bool:
        runs = pb.ListResponse.FromString(call(daemon, "List", b"").replies[0]).runs
        return all(r.state == pb.RUN_STATE_EXITED for r in runs)

    assert wait_until(all_exited), "runs still running after cancel"
    keeper = lock_holder(daemon.state / "keeper.lock")
    if keeper:
        assert wait_until(lambda: not children(keeper)), children(keeper)


# -- (a) raw bytes ---------------------------------------------------------------------------


def names_work(payload: bytes) -> bool:
    """Whether payload parses as a StartRequest that says what to run (never sent)."""
    try:
        return pb.StartRequest.FromString(payload).WhichOneof("work") is not None
    except DecodeError:
        return False


def decodes(message: type[Message], payload: bytes) -> bool:
    try:
        message.FromString(payload)
    except DecodeError:
        return False
    return True


REQUEST_TYPES: dict[str, type[Message]] = {
    **UNARY,
    **SERVER_STREAMING,
    "WriteFile": pb.WriteFileRequest,
}


def unsafe_write(messages: list[bytes]) -> bool:
    """Whether raw WriteFile bytes parse as a header naming an absolute or `..` path."""
    try:
        path = pb.WriteFileRequest.FromString(messages[0]).header.path
    except DecodeError:
        return False
    return path.startswith("/") or ".." in path


def check_raw(daemon: Daemon, method: str, messages: list[bytes]) -> None:
    if method == "Start" and names_work(messages[0]):
        return
    if method == "WriteFile" and unsafe_write(messages):
        return
    sent = messages if method == "WriteFile" else messages[:1]
    answer = call(daemon, method, sent if method == "WriteFile" else sent[0])
    if all(decodes(REQUEST_TYPES[method], m) for m in sent):
        check_answer(daemon, answer, malformed=False)
        return
    assert answer.error is not None, "undecodable bytes were accepted"
    assert isinstance(answer.error, grpc.Call)
    code = answer.error.code()
    assert code == grpc.StatusCode.INVALID_ARGUMENT or code in UNDECODABLE_TODAY, code
    assert daemon.alive(), "the daemon stopped answering"


def test_fuzz_raw_bytes(daemon: Daemon) -> None:
    @settings(
        max_examples=400,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        method=st.sampled_from(METHODS),
        messages=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    )
    def raw(method: str, messages: list[bytes]) -> None:
        check_raw(daemon, method, messages)

    raw()
    check_no_leftovers(daemon)


@pytest.mark.parametrize("method", METHODS)
def test_undecodable_request_is_invalid_argument(daemon: Daemon, method: str) -> None:
    corrupt = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length-delimited, length past the end
    payload: bytes | list[bytes] = [corrupt] if method == "WriteFile" else corrupt
    answer = call(daemon, method, payload)
    assert daemon.alive()
    assert isinstance(answer.error, grpc.Call)
    assert answer.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    check_error(answer.error)


# -- (b) mutated messages --------------------------------------------------------------------

NASTY_FLOATS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 1e308, 5e-324, 0.05]),
    st.floats(allow_nan=True, allow_infinity=True),
)
UINT32 = st.one_of(st.sampled_from([0, 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
UINT64 = st.one_of(st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
INT32 = st.integers(-(2**31), 2**31 - 1)
TEXT = st.text(max_size=40)
NASTY_TEXT = st.one_of(
    TEXT,
    st.sampled_from(["", "\0", "a\0b", "..", "../..", "/", "x" * 5000, "é/ü", "\n", " "]),
    st.text(min_size=200, max_size=600),
)


def mostly(valid: st.SearchStrategy[Any], nasty: st.SearchStrategy[Any]) -> Any:
    """valid four times in five: most requests get past validation to the code behind it."""
    return st.one_of(valid, valid, valid, valid, nasty)


# A fixed pool (not the ids of runs started so far: hypothesis needs its strategies to draw
# the same way every time), so Start, Attach, Cancel and Close often meet the same runs.
RUN_ID_POOL = [f"fz-{i}" for i in range(12)]
VALID_RUN_IDS = st.one_of(
    st.sampled_from(RUN_ID_POOL), st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z")
)
NASTY_RUN_IDS = st.one_of(NASTY_TEXT, st.just("r" * 129), st.just("a/b"))
RUN_IDS = mostly(VALID_RUN_IDS, NASTY_RUN_IDS)


@st.composite
def file_paths(draw: st.DrawFn, daemon: Daemon, for_write: bool = False) -> str:
    """Paths of every shape; for writes only ones that stay under the scratch dir (work is
    three levels below it, so three `..` from work are still inside)."""
    parts = draw(st.lists(st.sampled_from(["..", ".", "f", "d", "esc", "x\0y", "é"]), max_size=5))
    if for_write:
        ups = [i for i, part in enumerate(parts) if part == ".."]
        for i in ups[3:]:
            parts[i] = "."
    relative = "/".join(parts)
    shapes = [relative, str(daemon.work / relative)]
    if not for_write or ".." not in parts:
        shapes.append(str(daemon.base / relative))
    if not for_write:
        shapes += ["/etc/passwd", "/proc/self/environ", draw(NASTY_TEXT)]
    return str(draw(st.sampled_from(shapes)))


SAFE_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=30)
ENV_NAMES = st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,8}\Z")
START_FIELDS = (
    "run_id", "program", "args", "work", "env", "cwd", "stdin", "pty_size", "timeout",
    "grace", "limits",
)  # fmt: skip


@st.composite
def start_requests(draw: st.DrawFn, daemon: Daemon) -> pb.StartRequest:
    """A runnable request with at most one nasty field (half of them have none)."""
    bad = draw(st.one_of(st.none(), st.sampled_from(START_FIELDS)))

    def pick(name: str, valid: st.SearchStrategy[Any], nasty: st.SearchStrategy[Any]) -> Any:
        return draw(nasty if bad == name else valid)

    request = pb.StartRequest(run_id=pick("run_id", VALID_RUN_IDS, NASTY_RUN_IDS))
    program = pick("program", st.sampled_from(SAFE_PROGRAMS), NASTY_TEXT)
    if program not in SAFE_PROGRAMS:
        program = program.replace("/", "_")  # a bare name: looked up in the empty PATH
    args = pick("args", st.lists(SAFE_TEXT, max_size=4), st.lists(NASTY_TEXT, max_size=4))
    work = pick("work", st.sampled_from(["argv", "script"]), st.just("none"))
    if work == "argv":
        request.argv.args.extend([program, *args])
    elif work == "script":
        request.script.source = " ".join(args) or "x"
        request.script.interpreter = program
    env_nasty = st.dictionaries(NASTY_TEXT, NASTY_TEXT, max_size=6)
    request.env.update(pick("env", st.dictionaries(ENV_NAMES, SAFE_TEXT, max_size=4), env_nasty))
    if bad == "env" and draw(st.booleans()):
        request.env.update({f"HUGE_{i}": "v" * 1000 for i in range(draw(st.integers(0, 200)))})
    request.env["PATH"] = str(daemon.empty_path)
    odd_dirs = ["/no/such/dir", "relative", "\0", "/etc/passwd"]
    request.cwd = pick("cwd", st.sampled_from(["", str(daemon.work)]), st.sampled_from(odd_dirs))
    request.stdin = pick("stdin", st.integers(0, 2), st.integers(-(2**31), 2**31 - 1))
    request.pty = draw(st.booleans())
    request.pty_size.rows = pick("pty_size", st.integers(0, 200), UINT32)
    request.pty_size.cols = pick("pty_size", st.integers(0, 200), UINT32)
    request.timeout_seconds = pick("timeout", st.sampled_from([0.0, 0.5, 5.0]), NASTY_FLOATS)
    request.cancel_grace_seconds = pick("grace", st.sampled_from([0.0, 0.1]), NASTY_FLOATS)
    request.limits.max_output_bytes = pick("limits", st.sampled_from([0, 1, 4096]), UINT64)
    request.limits.journal_max_bytes = pick("limits", st.just(0), UINT64)
    return request


def start_is_malformed(request: pb.StartRequest) -> bool:
    """Whether simple rules already say INVALID_ARGUMENT (a subset of the runner's)."""
    floats = (request.timeout_seconds, request.cancel_grace_seconds)
    return (
        not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", request.run_id)
        or request.WhichOneof("work") is None
        or any(not math.isfinite(f) or f < 0 for f in floats)
        or "\0" in request.cwd
        or any("\0" in k + v or "=" in k or not k for k, v in request.env.items())
    )


def bad_path(path: str) -> bool:
    return not path or "\0" in path or len(path) > 4096


@st.composite
def write_streams(draw: st.DrawFn, daemon: Daemon) -> tuple[list[pb.WriteFileRequest], bool]:
    path = draw(file_paths(daemon, for_write=True))
    mode = draw(mostly(st.sampled_from([0, 0o600, 0o755]), UINT32))
    header = pb.WriteFileHeader(path=path, mode=mode, create_parents=draw(st.booleans()))
    chunks = [
        pb.WriteFileRequest(data=d) for d in draw(st.lists(st.binary(max_size=64), max_size=3))
    ]
    shape = draw(mostly(st.just("ok"), st.sampled_from(["no-header", "two-headers", "empty"])))
    if shape == "empty":
        return [], True
    if shape == "no-header":
        return chunks or [pb.WriteFileRequest(data=b"")], True
    messages = [pb.WriteFileRequest(header=header), *chunks]
    if shape == "two-headers":
        messages.append(pb.WriteFileRequest(header=header))
    malformed = bad_path(path) or bool(header.mode & 0o6000)  # both checked first
    return messages, malformed


def mutated(daemon: Daemon) -> st.SearchStrategy[tuple[str, Any, bool]]:
    """(method, request or WriteFile message list, whether it is surely malformed)."""
    ids = RUN_IDS
    paths = file_paths(daemon)

    def attach(r: pb.AttachRequest) -> tuple[str, Any, bool]:
        return "Attach", r, not math.isfinite(r.wait_seconds) or r.wait_seconds < 0

    def read(r: pb.ReadFileRequest) -> tuple[str, Any, bool]:
        return "ReadFile", r, bad_path(r.path)

    return st.one_of(
        start_requests(daemon).map(lambda r: ("Start", r, start_is_malformed(r))),
        st.builds(
            pb.AttachRequest,
            run_id=ids,
            after_seq=UINT64,
            wait_seconds=mostly(st.sampled_from([0.0, 0.05]), NASTY_FLOATS),
            max_batch_bytes=UINT32,
        ).map(attach),
        st.builds(
            pb.ReadFileRequest, path=paths, offset=UINT64, length=UINT64, chunk_bytes=UINT32
        ).map(read),
        write_streams(daemon).map(lambda w: ("WriteFile", w[0], w[1])),
        st.builds(pb.StatRequest, path=paths).map(lambda r: ("Stat", r, bad_path(r.path))),
        st.builds(pb.ListDirRequest, path=paths, max_entries=UINT32).map(
            lambda r: ("ListDir", r, bad_path(r.path))
        ),
        st.builds(
            pb.WriteStdinRequest, run_id=ids, data=st.binary(max_size=2048), eof=st.booleans()
        ).map(lambda r: ("WriteStdin", r, False)),
        st.builds(
            pb.ResizePtyRequest,
            run_id=ids,
            size=st.builds(pb.PtySize, rows=UINT32, cols=UINT32),
        ).map(
            lambda r: ("ResizePty", r, not (0 < r.size.rows <= 65535 and 0 < r.size.cols <= 65535))
        ),
        st.builds(pb.CancelRequest, run_id=ids, grace_seconds=NASTY_FLOATS).map(
            lambda r: (
                "Cancel",
                r,
                not math.isfinite(r.grace_seconds) or not 0 <= r.grace_seconds <= 3600,
            )
        ),
        st.builds(pb.StatusRequest, run_id=ids).map(lambda r: ("Status", r, False)),
        st.builds(pb.CloseRequest, run_id=ids, force=st.booleans()).map(
            lambda r: ("Close", r, False)
        ),
        st.just(("List", pb.ListRequest(), False)),
    )


def test_fuzz_mutated_messages(daemon: Daemon) -> None:
    before = outside_snapshot(daemon)

    @settings(
        max_examples=400,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def mutate(data: st.DataObject) -> None:
        method, request, malformed = data.draw(mutated(daemon))
        if method == "WriteFile":
            payload: bytes | list[bytes] = [m.SerializeToString() for m in request]
        else:
            payload = request.SerializeToString()
        answer = call(daemon, method, payload)
        check_answer(daemon, answer, malformed)

    mutate()
    check_no_leftovers(daemon)
    assert outside_snapshot(daemon) == before, "a write escaped the runner's root"


# -- (c) the direct attach channel -----------------------------------------------------------

FRAME = struct.Struct("<I")
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NEVER = (grpc.StatusCode.UNKNOWN.value[0], grpc.StatusCode.INTERNAL.value[0])


def direct_exchange(daemon: Daemon, data: bytes, shut: bool) -> list[pb.SessionResponse]:
    """Send raw bytes on the direct channel (then shut our sending side, if ``shut``) and
    read every frame until the last one, the daemon's close, or CALL_SECONDS."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(CALL_SECONDS)
    received = bytearray()
    try:
        conn.connect(str(daemon.socket) + ".direct")
        conn.sendall(data)
        if shut:
            conn.shutdown(socket.SHUT_WR)
        while chunk := conn.recv(65536):
            received += chunk
            if _frames(received) and _frames(received)[-1].done:
                break
    except (TimeoutError, ConnectionError):
        pass
    finally:
        conn.close()
    return _frames(received)


def _frames(data: bytearray) -> list[pb.SessionResponse]:
    """The whole frames in data; each must parse as a SessionResponse."""
    frames, pos = [], 0
    while len(data) - pos >= FRAME.size:
        (size,) = FRAME.unpack_from(data, pos)
        if len(data) - pos - FRAME.size < size:
            break
        frames.append(pb.SessionResponse.FromString(bytes(data[pos + 4 : pos + 4 + size])))
        pos += FRAME.size + size
    return frames


def check_direct(daemon: Daemon, frames: list[pb.SessionResponse], malformed: bool) -> None:
    for frame in frames:
        assert frame.error_code not in NEVER, frame
        for leak in LEAKS:
            assert not leak.search(frame.error_message), frame.error_message
    if malformed:
        assert frames, "no answer to a malformed direct request"
        assert frames[-1].error_code == INVALID_ARGUMENT, frames
    assert daemon.alive(), "the daemon stopped answering"


def framed(payload: bytes) -> bytes:
    return FRAME.pack(len(payload)) + payload


def test_fuzz_direct_channel_raw_bytes(daemon: Daemon) -> None:
    @settings(max_examples=200, deadline=None, database=None)
    @given(
        data=st.one_of(
            st.binary(max_size=64),
            st.binary(max_size=200).map(framed),
            st.tuples(UINT32, st.binary(max_size=64)).map(lambda t: FRAME.pack(t[0]) + t[1]),
        )
    )
    def raw(data: bytes) -> None:
        size = FRAME.unpack_from(data)[0] if len(data) >= FRAME.size else -1
        whole = 0 <= size <= len(data) - FRAME.size
        request = data[FRAME.size : FRAME.size + size]
        frames = direct_exchange(daemon, data, shut=True)
        check_direct(daemon, frames, malformed=not whole or not decodes(pb.AttachRequest, request))

    raw()
    check_no_leftovers(daemon)


def test_fuzz_direct_channel_requests(daemon: Daemon) -> None:
    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def mutate(data: st.DataObject) -> None:
        request = data.draw(
            st.builds(
                pb.AttachRequest,
                run_id=RUN_IDS,
                after_seq=UINT64,
                wait_seconds=mostly(st.sampled_from([0.0, 0.05]), NASTY_FLOATS),
                max_batch_bytes=UINT32,
            )
        )
        start = data.draw(st.one_of(st.none(), start_requests(daemon)))
        malformed = not math.isfinite(request.wait_seconds) or request.wait_seconds < 0
        if start is not None:
            start.run_id = request.run_id if data.draw(st.booleans()) else start.run_id
            request.start.CopyFrom(start)
            malformed = malformed or start_is_malformed(start) or start.run_id != request.run_id
        frames = direct_exchange(daemon, framed(request.SerializeToString()), shut=False)
        check_direct(daemon, frames, malformed)
        if frames and not frames[-1].error_code:
            assert frames[-1].done, "a direct attach ended without its last frame"

    mutate()
    check_no_leftovers(daemon)
