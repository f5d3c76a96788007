"""A short demonstration of the runner: ``python -m forgehand.runner.demo``.

Starts a ``forgehand-runner`` daemon, runs a command through it, kills the daemon with
SIGKILL while the command is still printing, starts a new daemon on the same state dir,
attaches again after the last event it saw, and shows that every line and the real exit
status arrived, each exactly once.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from forgehand.runner.client import RunnerClient
from forgehand.runner.keeper_client import stop_keeper
from forgehand.runner.model import Exited, Output, RunSpec

SCRIPT = 'for i in $(seq 1 20); do echo "line $i from pid $$"; sleep 0.1; done; exit 3'


async def _serve(base: Path) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "forgehand.runner.cli",
        "serve",
        "--socket",
        str(base / "runner.sock"),
        "--state-dir",
        str(base / "state"),
        "--root",
        str(base),
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    print(f"  daemon pid {process.pid}: {(await process.stderr.readline()).decode().strip()}")
    return process


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def demo() -> int:
    base = Path(tempfile.mkdtemp(prefix="fh-demo-", dir="/tmp"))
    socket = base / "runner.sock"
    lines: list[str] = []
    try:
        say("starting forgehand-runner")
        daemon = await _serve(base)
        say(f"running: sh -c '{SCRIPT}'")
        async with RunnerClient.unix(socket) as client:
            run_id = await client.start(RunSpec(argv=("sh", "-c", SCRIPT)), run_id="demo")
            last = 0
            async for event in client.attach(run_id):
                last = event.seq
                if isinstance(event, Output):
                    for line in event.data.decode().splitlines():
                        lines.append(line)
                        print(f"  {line}", flush=True)
                if len(lines) >= 5:
                    break
        say(f"killing the daemon (SIGKILL) after event {last}; the command keeps running")
        daemon.send_signal(signal.SIGKILL)
        await daemon.wait()
        await asyncio.sleep(0.5)
        say("starting a new daemon on the same state dir and attaching after that event")
        daemon = await _serve(base)
        async with RunnerClient.unix(socket) as client:
            async for event in client.attach(run_id, after_seq=last):
                if isinstance(event, Output):
                    for line in event.data.decode().splitlines():
                        lines.append(line)
                        print(f"  {line}", flush=True)
                elif isinstance(event, Exited):
                    say(f"exit: code {event.code}, reason {event.reason.value}")
        complete = [f"line {i}" for i in range(1, 21)] == [" ".join(x.split()[:2]) for x in lines]
        say(f"{len(lines)} of 20 lines, each once: {'yes' if complete else 'NO'}")
        daemon.terminate()
        await daemon.wait()
        return 0 if complete else 1
    finally:
        stop_keeper(base / "state")
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    sys.exit(asyncio.run(demo()))


if __name__ == "__main__":
    main()
