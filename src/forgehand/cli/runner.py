"""``forgehand runner start|attach|exec|status|cancel``: drive a runner from the shell.

``attach`` and ``exec`` write the run's stdout and stderr to their own, byte for byte, and
exit with the run's exit code (128 + signal when it was killed; a runner-side failure or
a limit prints the reason on stderr and exits 125).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import sys
import threading
from pathlib import Path
from typing import Any

from forgehand.runner import errors
from forgehand.runner.client import RunnerClient
from forgehand.runner.model import Exited, ExitReason, Handback, Output, RunSpec, Stream

RUNNER_FAILURE = 125


def register(commands: Any) -> None:
    runner = commands.add_parser("runner", help="talk to a forgehand-runner daemon")
    sub = runner.add_subparsers(dest="runner_command", required=True, metavar="COMMAND")

    start = sub.add_parser("start", help="start a run, print its id, return at once")
    _connection(start)
    _spec_options(start)
    start.set_defaults(handler=lambda a: _sync(_start(a)))

    attach = sub.add_parser("attach", help="stream a run's output and exit with its code")
    _connection(attach)
    attach.add_argument("run_id")
    attach.add_argument("--after", type=int, default=0, help="replay events after this seq")
    attach.set_defaults(handler=lambda a: _sync(_attach(a)))

    execute = sub.add_parser("exec", help="start a run and attach to it")
    _connection(execute)
    _spec_options(execute)
    execute.set_defaults(handler=lambda a: _sync(_exec(a)))

    status = sub.add_parser("status", help="show a run's state")
    _connection(status)
    status.add_argument("run_id")
    status.set_defaults(handler=lambda a: _sync(_status(a)))

    cancel = sub.add_parser("cancel", help="cancel a run (TERM, grace, KILL)")
    _connection(cancel)
    cancel.add_argument("run_id")
    cancel.add_argument("--grace", type=float, default=2.0)
    cancel.set_defaults(handler=lambda a: _sync(_cancel(a)))


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, required=True, help="the runner's unix socket")


def _spec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", dest="run_id", help="run id (default: a new random one)")
    parser.add_argument("--cwd", default="", help="absolute working directory")
    parser.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment of the run (nothing is inherited); repeatable",
    )
    parser.add_argument("--timeout", type=float, default=0.0, help="seconds; 0 = none")
    parser.add_argument("--stdin", action="store_true", help="forward this stdin to the run")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS…]")


def _spec(args: argparse.Namespace) -> RunSpec:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise errors.InvalidArgument("give the command after --, e.g. `-- echo hello`")
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise errors.InvalidArgument(f"--env takes NAME=VALUE, got {item!r}")
        env[name] = value
    env.setdefault("PATH", os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"))
    return RunSpec(
        argv=tuple(command),
        cwd=args.cwd,
        env=env,
        timeout_seconds=args.timeout,
        stdin=args.stdin,
    )


def _sync(coro: Any) -> int:
    try:
        code: int = asyncio.run(coro)
    except errors.RunnerError as exc:
        print(f"forgehand: {exc}", file=sys.stderr)
        return RUNNER_FAILURE
    return code


async def _start(args: argparse.Namespace) -> int:
    async with RunnerClient.unix(args.socket) as client:
        print(await client.start(_spec(args), args.run_id))
    return 0


async def _attach(args: argparse.Namespace) -> int:
    async with RunnerClient.unix(args.socket) as client:
        return await stream_run(client, args.run_id, args.after)


async def _exec(args: argparse.Namespace) -> int:
    spec = _spec(args)
    async with RunnerClient.unix(args.socket) as client:
        run_id = await client.start(spec, args.run_id)
        feeder = asyncio.create_task(feed_stdin(client, run_id)) if spec.stdin else None
        try:
            return await stream_run(client, run_id, 0)
        finally:
            if feeder is not None:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)


async def feed_stdin(client: RunnerClient, run_id: str) -> None:
    """Copy our stdin to the run, then close its stdin. The reads happen in a daemon
    thread: one blocked on a terminal or an open pipe must not keep us from exiting once
    the run has ended (``asyncio.run`` waits for its executor's threads)."""
    chunks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)
    loop = asyncio.get_running_loop()
    threading.Thread(target=_read_stdin, args=(loop, chunks), daemon=True).start()
    while data := await chunks.get():
        await client.write_stdin(run_id, data)
    await client.write_stdin(run_id, b"", eof=True)


def _read_stdin(loop: asyncio.AbstractEventLoop, chunks: asyncio.Queue[bytes]) -> None:
    while True:
        try:
            data = os.read(0, 1 << 16)
        except OSError:
            data = b""
        try:
            asyncio.run_coroutine_threadsafe(chunks.put(data), loop).result()
        except (RuntimeError, concurrent.futures.CancelledError):
            return  # the loop is closed or the feeder gone
        if not data:
            return


async def stream_run(client: RunnerClient, run_id: str, after: int) -> int:
    """Copy a run's output to our stdout/stderr; return the exit code to exit with."""
    out, err = sys.stdout.buffer, sys.stderr.buffer
    async for event in client.attach(run_id, after):
        if isinstance(event, Output):
            sink = err if event.stream is Stream.STDERR else out
            sink.write(event.data)
            sink.flush()
        elif isinstance(event, Exited):
            return exit_code(event)
        elif isinstance(event, Handback):
            break
    return 0


def exit_code(exited: Exited) -> int:
    if exited.reason is ExitReason.EXITED:
        return exited.code
    print(f"forgehand: run ended: {exited.reason.value}: {exited.message}", file=sys.stderr)
    if exited.signal:
        return 128 + exited.signal
    return exited.code if exited.code > 0 else RUNNER_FAILURE


async def _status(args: argparse.Namespace) -> int:
    async with RunnerClient.unix(args.socket) as client:
        info = await client.status(args.run_id)
    state = (
        "running" if info.running else f"exited ({info.exit.reason.value if info.exit else '?'})"
    )
    print(f"{info.run_id} {state} pid={info.pid} last_seq={info.last_seq}")
    if info.exit is not None:
        print(f"code={info.exit.code} signal={info.exit.signal} {info.exit.message}".rstrip())
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    async with RunnerClient.unix(args.socket) as client:
        was_running = await client.cancel(args.run_id, args.grace)
    print("cancelled" if was_running else "was not running")
    return 0
