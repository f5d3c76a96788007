"""The run contract, over every transport (unix gRPC, stdio proxy, in-process)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from conftest import make_config

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner import errors
from forgehand.runner.client import LocalTransport, RunnerClient
from forgehand.runner.core import RunnerCore
from forgehand.runner.model import (
    Event,
    Exited,
    ExitReason,
    Handback,
    Output,
    RunSpec,
    Started,
    Stream,
)


def sh(script: str, **kwargs: object) -> RunSpec:
    return RunSpec(argv=("sh", "-c", script), **kwargs)  # type: ignore[arg-type]


async def events_of(client: RunnerClient, run_id: str, after: int = 0) -> list[Event | Handback]:
    return [event async for event in client.attach(run_id, after)]


async def test_runs_a_command_and_reports_exit(client: RunnerClient) -> None:
    result = await client.run(sh("echo out; echo err >&2; exit 3"))
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"
    assert result.exit.code == 3
    assert result.exit.reason is ExitReason.EXITED
    assert not result.ok


async def test_events_have_consecutive_sequence_numbers(client: RunnerClient) -> None:
    run_id = await client.start(sh("echo a; echo b >&2; echo c"))
    events = await events_of(client, run_id)
    assert isinstance(events[0], Started)
    assert isinstance(events[-1], Exited)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


@pytest.mark.parametrize(
    "payload",
    [
        b"no trailing newline",
        b"\x00\x01\x02 nul bytes \x00",
        b"\xff\xfe invalid utf-8 \xc3\x28",
        b"x" * (1024 * 1024 + 7),
        b"\n\n\n blank lines \n\n",
    ],
    ids=["no-newline", "nul", "invalid-utf8", "1mib-line", "blank-lines"],
)
async def test_output_arrives_byte_exact(client: RunnerClient, work: Path, payload: bytes) -> None:
    (work / "payload.bin").write_bytes(payload)
    result = await client.run(RunSpec(argv=("cat", str(work / "payload.bin"))))
    assert result.stdout == payload


async def test_script_runs_with_its_interpreter(client: RunnerClient) -> None:
    result = await client.run(RunSpec(script="print(6 * 7)", interpreter="/usr/bin/python3"))
    assert result.stdout == b"42\n"


async def test_environment_is_only_what_the_request_names(
    client: RunnerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGEHAND_TEST_SECRET", "must-not-leak")
    result = await client.run(RunSpec(argv=("env",), env={"ONLY": "this"}))
    lines = set(result.stdout.decode().splitlines())
    assert "ONLY=this" in lines
    assert not any(line.startswith("FORGEHAND_TEST_SECRET") for line in lines)


async def test_cwd_is_honoured(client: RunnerClient, work: Path) -> None:
    result = await client.run(RunSpec(argv=("pwd",), cwd=str(work)))
    assert result.stdout.decode().strip() == str(work)


async def test_missing_command_is_an_error_exit(client: RunnerClient) -> None:
    result = await client.run(RunSpec(argv=("no-such-command-anywhere",)))
    assert result.exit.reason is ExitReason.ERROR
    assert result.exit.code == 127
    assert b"command not found" in result.stderr


async def test_timeout_kills_the_run(client: RunnerClient) -> None:
    result = await client.run(RunSpec(argv=("sleep", "30"), timeout_seconds=0.3))
    assert result.exit.reason is ExitReason.TIMEOUT
    assert result.exit.signal != 0
    assert result.exit.duration_seconds < 10


async def test_timeout_escalates_to_kill_when_term_is_ignored(client: RunnerClient) -> None:
    spec = sh("trap '' TERM; sleep 30", timeout_seconds=0.2, cancel_grace_seconds=0.3)
    result = await client.run(spec)
    assert result.exit.reason is ExitReason.TIMEOUT
    assert result.exit.signal == 9


async def test_output_limit_ends_the_run(client: RunnerClient) -> None:
    result = await client.run(RunSpec(argv=("yes",), max_output_bytes=100_000))
    assert result.exit.reason is ExitReason.LIMIT
    assert len(result.stdout) == 100_000
    assert "100000" in result.exit.message


async def test_signalled_exit_reports_the_signal(client: RunnerClient) -> None:
    result = await client.run(sh("kill -KILL $$"))
    assert result.exit.reason is ExitReason.SIGNALLED
    assert result.exit.signal == 9
    assert result.exit.code == -1


async def test_a_real_time_signal_is_reported_and_the_runner_carries_on(
    client: RunnerClient,
) -> None:
    """``signal.Signals`` has no member for most real-time signals; naming one once ended
    the keeper, and every run of the sandbox with it."""
    result = await client.run(sh("kill -40 $$"))
    assert (result.exit.reason, result.exit.signal) == (ExitReason.SIGNALLED, 40)
    assert result.exit.message == "killed by signal SIGRTMIN+6"
    assert (await client.run(sh("echo still here"))).stdout == b"still here\n"


@pytest.mark.parametrize(
    ("script", "reason", "message"),
    [
        ("bump; exit 3", ExitReason.OOM, "exited with status 3 after the out-of-memory killer"),
        ("bump; kill -KILL $$", ExitReason.OOM, "killed by the out-of-memory killer"),
        ("bump; kill -SEGV $$", ExitReason.OOM, "killed by SIGSEGV after the out-of-memory"),
        ("bump; exit 0", ExitReason.EXITED, ""),
        ("exit 3", ExitReason.EXITED, ""),
        ("kill -KILL $$", ExitReason.SIGNALLED, "killed by signal SIGKILL"),
    ],
)
async def test_a_run_that_fails_while_the_oom_counter_rises_ended_by_oom(
    short_tmp: Path, script: str, reason: ExitReason, message: str
) -> None:
    """The OOM killer may pick a child of the run, or (gVisor) a process of the sandbox's
    kernel: the run then fails any way at all. ``memory_events`` is a stand-in for the
    cgroup's file, which the script bumps as the killer would."""
    events = short_tmp / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    config = make_config(short_tmp, memory_events=str(events))
    bump = f"bump() {{ printf 'max 9\\noom 2\\noom_kill 2\\n' > {events}; }}"
    async with RunnerCore(config) as core, RunnerClient(LocalTransport(core)) as client:
        result = await client.run(sh(f"{bump}; {script}"))
    assert result.exit.reason is reason
    assert result.exit.message.startswith(message)


async def test_a_run_we_ended_keeps_its_reason_when_the_oom_counter_rose(
    short_tmp: Path,
) -> None:
    events = short_tmp / "memory.events"
    events.write_text("oom_kill 0\n")
    config = make_config(short_tmp, memory_events=str(events))
    script = f"trap 'exit 7' TERM; echo oom_kill 1 > {events}; echo ready; sleep 30 & wait"
    async with RunnerCore(config) as core, RunnerClient(LocalTransport(core)) as client:
        run_id = await client.start(sh(script))
        await _wait_output(client, run_id, b"ready")
        assert await client.cancel(run_id, grace_seconds=5)
        result = await client.collect(run_id)
    assert (result.exit.reason, result.exit.code) == (ExitReason.CANCELLED, 7)


async def test_cancel_is_graceful(client: RunnerClient) -> None:
    run_id = await client.start(
        sh("trap 'echo got-term; exit 7' TERM; echo ready; sleep 30 & wait")
    )
    await _wait_output(client, run_id, b"ready")
    assert await client.cancel(run_id, grace_seconds=5)
    result = await client.collect(run_id)
    assert result.exit.reason is ExitReason.CANCELLED
    assert b"got-term" in result.stdout


async def test_cancel_kills_after_grace(client: RunnerClient) -> None:
    run_id = await client.start(sh("trap '' TERM; echo ready; sleep 30"))
    await _wait_output(client, run_id, b"ready")  # the trap is set (Started comes before)
    await client.cancel(run_id, grace_seconds=0.2)
    result = await client.collect(run_id)
    assert result.exit.reason is ExitReason.CANCELLED
    assert result.exit.signal == 9
    assert not await client.cancel(run_id), "cancelling a finished run reports it was not running"


async def test_background_children_do_not_outlive_the_run(client: RunnerClient, work: Path) -> None:
    marker = work / "child.pid"
    result = await client.run(sh(f"sleep 300 & echo $! > {marker}; exit 0"))
    assert result.ok
    pid = int(marker.read_text())
    for _ in range(100):
        if not _alive(pid):
            break
        await asyncio.sleep(0.02)
    assert not _alive(pid)


async def test_stdin_pipe(client: RunnerClient) -> None:
    result = await client.run(RunSpec(argv=("cat",), stdin=True), stdin=b"hello\x00world")
    assert result.stdout == b"hello\x00world"


async def test_stdin_streams_in_pieces(client: RunnerClient) -> None:
    run_id = await client.start(RunSpec(argv=("cat",), stdin=True))
    for piece in (b"one ", b"two ", b"three"):
        await client.write_stdin(run_id, piece)
    await client.write_stdin(run_id, b"", eof=True)
    assert (await client.collect(run_id)).stdout == b"one two three"


async def test_stdin_to_a_run_without_stdin_fails(client: RunnerClient) -> None:
    run_id = await client.start(RunSpec(argv=("sleep", "5")))
    with pytest.raises(errors.FailedPrecondition, match="without stdin"):
        await client.write_stdin(run_id, b"x")
    await client.cancel(run_id, 0.1)


async def test_pty_gives_a_terminal_of_the_requested_size(client: RunnerClient) -> None:
    spec = sh(
        "test -t 0 && test -t 1 && echo is-a-tty; stty size", pty=True, pty_rows=33, pty_cols=101
    )
    result = await client.run(spec)
    assert b"is-a-tty" in result.pty
    assert b"33 101" in result.pty
    assert result.stdout == b""


async def test_pty_resize_and_input(client: RunnerClient) -> None:
    run_id = await client.start(sh("read line; stty size; echo got:$line", pty=True))
    await _wait_started(client, run_id)
    await client.resize_pty(run_id, 40, 120)
    await client.write_stdin(run_id, b"hello\n")
    result = await client.collect(run_id)
    assert b"40 120" in result.pty
    assert b"got:hello" in result.pty


async def test_resize_without_pty_fails(client: RunnerClient) -> None:
    run_id = await client.start(RunSpec(argv=("sleep", "5")))
    with pytest.raises(errors.FailedPrecondition, match="no terminal"):
        await client.resize_pty(run_id, 10, 10)
    await client.cancel(run_id, 0.1)


async def test_start_is_idempotent_by_run_id(client: RunnerClient) -> None:
    spec = sh("echo once >> counter; cat counter", cwd=str(await _root(client)))
    first = await client.start(spec, run_id="same-id")
    second = await client.start(spec, run_id="same-id")
    assert first == second == "same-id"
    result = await client.collect("same-id")
    assert result.stdout == b"once\n"


async def test_same_id_with_another_request_is_already_exists(client: RunnerClient) -> None:
    await client.start(RunSpec(argv=("true",)), run_id="taken")
    with pytest.raises(errors.AlreadyExists):
        await client.start(RunSpec(argv=("false",)), run_id="taken")


async def test_attach_replays_after_a_sequence_number(client: RunnerClient) -> None:
    run_id = await client.start(sh("for i in 1 2 3 4 5; do echo $i; sleep 0.02; done"))
    everything = await events_of(client, run_id)
    assert len(everything) >= 7
    middle = everything[2].seq
    rest = await events_of(client, run_id, after=middle)
    assert rest == everything[3:]
    assert await events_of(client, run_id) == everything
    assert await events_of(client, run_id, after=everything[-1].seq) == []


async def test_attach_hands_back_without_killing(client: RunnerClient) -> None:
    run_id = await client.start(sh("echo early; sleep 0.8; echo late"))
    seen = [e async for e in client.attach(run_id, wait_seconds=0.2)]
    assert isinstance(seen[-1], Handback)
    assert (await client.status(run_id)).running
    rest = [e async for e in client.attach(run_id, after_seq=seen[-1].seq)]
    data = b"".join(e.data for e in seen + rest if isinstance(e, Output))
    assert data == b"early\nlate\n"
    assert isinstance(rest[-1], Exited)
    assert rest[-1].ok


async def test_status_list_and_close(client: RunnerClient) -> None:
    done = await client.start(RunSpec(argv=("true",)), run_id="done-run")
    await client.collect(done)
    running = await client.start(RunSpec(argv=("sleep", "30")), run_id="running-run")
    info = await client.status(running)
    assert info.running
    finished = await client.status(done)
    assert not finished.running
    assert finished.exit is not None
    assert finished.exit.ok
    assert {r.run_id for r in await client.list_runs()} >= {"done-run", "running-run"}
    with pytest.raises(errors.FailedPrecondition, match="still running"):
        await client.close_run(running)
    await client.close_run(running, force=True)
    await client.close_run(done)
    with pytest.raises(errors.NotFound):
        await client.status(done)
    assert not {r.run_id for r in await client.list_runs()} & {"done-run", "running-run"}


@pytest.mark.parametrize("call", ["attach", "status", "cancel", "close", "stdin", "resize"])
async def test_unknown_run_is_not_found(client: RunnerClient, call: str) -> None:
    actions = {
        "attach": lambda: events_of(client, "nope"),
        "status": lambda: client.status("nope"),
        "cancel": lambda: client.cancel("nope"),
        "close": lambda: client.close_run("nope"),
        "stdin": lambda: client.write_stdin("nope", b"x"),
        "resize": lambda: client.resize_pty("nope", 1, 1),
    }
    with pytest.raises(errors.NotFound):
        await actions[call]()


@pytest.mark.parametrize(
    ("spec", "run_id", "match"),
    [
        (RunSpec(argv=("true",)), "bad id!", "run_id"),
        (RunSpec(argv=("true",)), "x" * 200, "run_id"),
        (RunSpec(argv=()), "ok", "argv"),
        (RunSpec(argv=("ec\0ho",)), "ok", "NUL"),
        (RunSpec(argv=("true",), cwd="relative/dir"), "ok", "absolute"),
        (RunSpec(argv=("true",), cwd="/no/such/dir"), "ok", "not a directory"),
        (RunSpec(argv=("true",), timeout_seconds=-1), "ok", "timeout_seconds"),
        (RunSpec(argv=("true",), timeout_seconds=float("nan")), "ok", "timeout_seconds"),
        (RunSpec(argv=("true",), env={"A=B": "x"}), "ok", "environment"),
    ],
)
async def test_malformed_start_is_invalid_argument(
    client: RunnerClient, spec: RunSpec, run_id: str, match: str
) -> None:
    with pytest.raises(errors.InvalidArgument, match=match):
        await client.start(spec, run_id=run_id)


async def test_capabilities(client: RunnerClient) -> None:
    caps = await client.capabilities()
    assert caps.protocol == "forgehand.runner.v1"
    assert "pty" in caps.features
    assert caps.limits.max_runs > 0


async def test_output_streams_are_kept_apart(client: RunnerClient) -> None:
    result = await client.run(sh("for i in $(seq 200); do echo o$i; echo e$i >&2; done"))
    assert result.stdout.decode().split() == [f"o{i}" for i in range(1, 201)]
    assert result.stderr.decode().split() == [f"e{i}" for i in range(1, 201)]


async def test_many_concurrent_runs(client: RunnerClient) -> None:
    results = await asyncio.gather(*(client.run(sh(f"echo run-{i}")) for i in range(20)))
    assert sorted(r.stdout for r in results) == sorted(f"run-{i}\n".encode() for i in range(20))


async def _wait_started(client: RunnerClient, run_id: str) -> None:
    async for event in client.attach(run_id, wait_seconds=5):
        if isinstance(event, Started):
            return
    raise AssertionError("run did not start")


async def _wait_output(client: RunnerClient, run_id: str, marker: bytes) -> None:
    async for event in client.attach(run_id, wait_seconds=10):
        if isinstance(event, Output) and marker in event.data:
            return
    raise AssertionError(f"run never printed {marker!r}")


async def _root(client: RunnerClient) -> Path:
    caps = await client.capabilities()
    return Path(caps.file_roots[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


async def test_max_runs_is_resource_exhausted(short_tmp: Path) -> None:
    async with RunnerCore(make_config(short_tmp, max_runs=2)) as core:
        client = RunnerClient(LocalTransport(core))
        for i in range(2):
            await client.start(RunSpec(argv=("sleep", "30")), run_id=f"r{i}")
        with pytest.raises(errors.ResourceExhausted, match="limit is 2"):
            await client.start(RunSpec(argv=("sleep", "30")), run_id="r2")
        await client.cancel("r0", 0.1)
        await client.collect("r0")
        await client.start(RunSpec(argv=("true",)), run_id="r3")
        await client.cancel("r1", 0.1)
        await client.collect("r1")


async def test_stream_kinds_are_labelled(client: RunnerClient) -> None:
    run_id = await client.start(sh("echo o; echo e >&2"))
    outputs = [e for e in await events_of(client, run_id) if isinstance(e, Output)]
    assert {(o.stream, o.data) for o in outputs} == {
        (Stream.STDOUT, b"o\n"),
        (Stream.STDERR, b"e\n"),
    }


async def test_oversized_request_is_invalid_argument(server: object, short_tmp: Path) -> None:
    from forgehand.runner.client import GrpcTransport, UnixConnector

    transport = GrpcTransport(UnixConnector(short_tmp / "runner.sock"))
    request = RunSpec(argv=("echo", "x" * (17 * 1024 * 1024))).to_proto("big")
    try:
        with pytest.raises(errors.InvalidArgument, match="over the runner's limit"):
            await transport.start(request, 30)
    finally:
        await transport.close()


async def test_an_attach_that_cannot_be_followed_starts_nothing(client: RunnerClient) -> None:
    request = pb.AttachRequest(run_id="never-started", wait_seconds=-1.0)
    request.start.CopyFrom(sh("echo no").to_proto("never-started"))
    with pytest.raises(errors.InvalidArgument, match="wait_seconds"):
        async for _ in client.transport.attach(request, 30):
            pass
    with pytest.raises(errors.NotFound):
        await client.status("never-started")
