"""``forgehand bench runner --json``: the runner against host baselines, side by side.

- exec_rtt_ms: a no-op command (`true`) started and awaited through the runner (over its
  unix socket: ``runner_unix`` attaches over the direct channel, as a client does by
  default, ``runner_unix_grpc`` over gRPC only; and over the stdio proxy as an exec
  channel would) vs ``asyncio.create_subprocess_exec`` on the host, all in one run, in
  turns (one call of each per round, so load from elsewhere on the machine falls on all
  alike); exec_p50_x_host is each runner p50 over the host's.
- stream_mb_s: 256 MiB of stdout through the runner (journal included; ``runner`` over
  the direct channel, ``runner_grpc`` over gRPC) vs a local pipe, in turns, five times
  each (medians).
- reconnect: 100 forced disconnects during a 64 MiB output run, through relays whose
  connections are cut (the attach over the direct channel; ``reconnect_grpc`` the same
  over gRPC); bytes lost and duplicated are counted against the known output, and resume
  time is from the cut to the next event delivered.

The daemon runs as its own process (``forgehand-runner serve``), as it does in a sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from forgehand.runner.client import GrpcTransport, RunnerClient, UnixConnector
from forgehand.runner.config import direct_socket_path
from forgehand.runner.keeper_client import stop_keeper
from forgehand.runner.model import Exited, Output, RunSpec
from forgehand.runner.tuning import tune_malloc

MIB = 1024 * 1024
BLOCK = 64 * 1024
STREAM_ROUNDS = 5
# Writes `blocks` 64 KiB blocks, each stamped with its index, flushing each one and pausing
# briefly so the output arrives as many events (each a chance to cut the connection).
GENERATOR = (
    "import sys, time\n"
    "out = sys.stdout.buffer\n"
    "pad = b'.' * (65536 - 16)\n"
    "for i in range({blocks}):\n"
    "    out.write(b'%015d\\n' % i + pad); out.flush(); time.sleep(0.0005)\n"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--runs", type=int, default=200, help="exec round trips per variant")
    parser.add_argument("--stream-mib", type=int, default=256)
    parser.add_argument("--reconnect-mib", type=int, default=64)
    parser.add_argument("--disconnects", type=int, default=100)
    parser.add_argument(
        "--state-parent",
        default="/dev/shm" if os.path.isdir("/dev/shm") else "/tmp",
        help="where the daemon's state dir goes; a sandbox keeps it on a tmpfs, and so does "
        "the benchmark by default",
    )


def main(args: argparse.Namespace) -> int:
    tune_malloc()
    result = asyncio.run(run_benchmark(args))
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="fh-bench-", dir=args.state_parent))
    try:
        async with daemon(base, journal_mib=max(512, 2 * args.stream_mib)) as socket:
            rtt = await exec_rtt(socket, args.runs)
            return {
                "exec_rtt_ms": rtt,
                "exec_p50_x_host": versus_host(rtt),
                "stream_mb_s": await stream(socket, args.stream_mib),
                "reconnect": await reconnect(
                    socket, base, args.reconnect_mib, args.disconnects, direct=True
                ),
                "reconnect_grpc": await reconnect(
                    socket, base, args.reconnect_mib, args.disconnects, direct=False
                ),
                "machine": machine(),
            }
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.asynccontextmanager
async def daemon(base: Path, journal_mib: int) -> AsyncIterator[Path]:
    socket = base / "runner.sock"
    (base / "work").mkdir()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "forgehand.runner.cli",
        "serve",
        "--socket",
        str(socket),
        "--state-dir",
        str(base / "state"),
        "--root",
        str(base / "work"),
        "--journal-max-bytes",
        str(journal_mib * MIB),
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    await process.stderr.readline()
    try:
        yield socket
    finally:
        process.terminate()
        await process.wait()
        stop_keeper(base / "state")


@contextlib.asynccontextmanager
async def relay_process(target: Path, listen: Path) -> AsyncIterator[Callable[[], None]]:
    """A relay in its own process (so its pumping does not share the client's event loop),
    and a function that cuts every connection through it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "forgehand.bench.relay",
        str(listen),
        str(target),
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    await process.stdout.readline()
    try:
        yield lambda: process.send_signal(signal.SIGUSR1)
    finally:
        process.terminate()
        await process.wait()


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"p50": round(statistics.median(ordered), 3), "p99": round(p99, 3)}


async def timed(
    calls: dict[str, Callable[[], Awaitable[object]]], runs: int
) -> dict[str, list[float]]:
    """Run each call ``runs`` times, in turns (one of each per round, so a load that comes and
    goes on the machine falls on all of them alike); ms per call, by name."""
    for _ in range(max(5, runs // 10)):  # warm up
        for call in calls.values():
            await call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            await call()
            samples[name].append((time.perf_counter() - start) * 1000)
    return samples


async def exec_rtt(socket: Path, runs: int) -> dict[str, dict[str, float]]:
    spec = RunSpec(argv=("true",))

    async def host() -> None:
        process = await asyncio.create_subprocess_exec("true")
        await process.wait()

    proxy = [sys.executable, "-m", "forgehand.runner.cli", "proxy", "--socket", str(socket)]
    async with (
        RunnerClient.unix(socket) as unix,
        grpc_only(socket) as unix_grpc,
        RunnerClient.exec(proxy) as stdio,
    ):
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "runner_unix": lambda: unix.run(spec),
            "runner_unix_grpc": lambda: unix_grpc.run(spec),
            "runner_stdio_proxy": lambda: stdio.run(spec),
            "host_subprocess": host,
        }
        samples = await timed(calls, runs)
    return {name: percentiles(values) for name, values in samples.items()}


def versus_host(rtt: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each runner variant's exec p50 as a multiple of the host's (the target is <= 2)."""
    host = rtt["host_subprocess"]["p50"]
    variants = ("runner_unix", "runner_unix_grpc", "runner_stdio_proxy")
    return {name: round(rtt[name]["p50"] / host, 2) if host else 0.0 for name in variants}


async def stream(socket: Path, mib: int, rounds: int = STREAM_ROUNDS) -> dict[str, float]:
    """Runner and pipe in turns, ``rounds`` times each; the median of each."""
    argv = ("head", "-c", str(mib * MIB), "/dev/zero")
    runner_s, grpc_s, pipe_s = [], [], []
    async with RunnerClient.unix(socket) as client, grpc_only(socket) as over_grpc:
        for _ in range(rounds):
            runner_s.append(await _runner_seconds(client, argv, mib * MIB))
            grpc_s.append(await _runner_seconds(over_grpc, argv, mib * MIB))
            pipe_s.append(await _pipe_seconds(argv))

    def rate(seconds: list[float]) -> float:
        return round(mib * MIB / statistics.median(seconds) / 1e6, 1)

    return {"runner": rate(runner_s), "runner_grpc": rate(grpc_s), "pipe": rate(pipe_s)}


def grpc_only(socket: Path) -> RunnerClient:
    """A client of the unix socket that attaches over gRPC, not the direct channel."""
    return RunnerClient(GrpcTransport(UnixConnector(socket), use_direct=False))


async def _runner_seconds(client: RunnerClient, argv: tuple[str, ...], size: int) -> float:
    start = time.perf_counter()
    received = 0
    run_id = await client.start(RunSpec(argv=argv))
    async for event in client.attach(run_id):
        if isinstance(event, Output):
            received += len(event.data)
    seconds = time.perf_counter() - start
    await client.close_run(run_id)
    assert received == size, f"runner delivered {received} of {size} bytes"
    return seconds


async def _pipe_seconds(argv: tuple[str, ...]) -> float:
    start = time.perf_counter()
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    while await process.stdout.read(MIB):
        pass
    await process.wait()
    return time.perf_counter() - start


async def reconnect(
    socket: Path, base: Path, mib: int, disconnects: int, direct: bool
) -> dict[str, Any]:
    """Cuts through relays of the gRPC socket and (``direct``) of the direct channel's,
    which the client then attaches over."""
    blocks = mib * MIB // BLOCK
    spec = RunSpec(argv=("/usr/bin/python3", "-c", GENERATOR.format(blocks=blocks)))
    seen: dict[int, int] = {}
    cuts = 0
    every = max(1, blocks // (2 * disconnects))  # room for all cuts, one at a time
    _partial.clear()
    relayed = base / f"relay-{uuid.uuid4().hex[:8]}.sock"
    async with contextlib.AsyncExitStack() as stack:
        cutters = [await stack.enter_async_context(relay_process(socket, relayed))]
        if direct:
            target, listen = direct_socket_path(socket), direct_socket_path(relayed)
            assert target is not None
            assert listen is not None
            cutters.append(await stack.enter_async_context(relay_process(target, listen)))
        over = RunnerClient.unix(relayed) if direct else grpc_only(relayed)
        client = await stack.enter_async_context(over)

        def cut() -> None:
            for cutter in cutters:
                cutter()

        run_id = await client.start(spec)
        received_blocks = 0
        async for event in client.attach(run_id):
            if isinstance(event, Output):
                received_blocks += _count_blocks(event.data, seen)
                # One cut at a time: the next only once the client has reconnected.
                due = cuts < disconnects and received_blocks >= every * (cuts + 1)
                if due and client.reconnects >= cuts:
                    cuts += 1
                    cut()
            elif isinstance(event, Exited):
                break
        reconnects, resumes = client.reconnects, client.resume_ms
    lost = sum(1 for i in range(blocks) if i not in seen) * BLOCK
    duplicated = sum(count - 1 for count in seen.values()) * BLOCK
    return {
        "disconnects": cuts,
        "reconnects": reconnects,
        "bytes_lost": lost,
        "bytes_duplicated": duplicated,
        "resume_ms_p50": round(statistics.median(resumes), 3) if resumes else None,
        "resume_ms_p99": percentiles(resumes)["p99"] if resumes else None,
    }


_partial = bytearray()


def _count_blocks(data: bytes, seen: dict[int, int]) -> int:
    """Count each whole 64 KiB block by its stamped index (blocks may span events)."""
    _partial.extend(data)
    whole = len(_partial) // BLOCK
    for k in range(whole):
        index = int(_partial[k * BLOCK : k * BLOCK + 15])
        seen[index] = seen.get(index, 0) + 1
    del _partial[: whole * BLOCK]
    return whole


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "os": _os_name(),
    }


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return subprocess.run(["uname", "-s"], capture_output=True, text=True).stdout.strip()
