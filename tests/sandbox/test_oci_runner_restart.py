"""On gVisor and podman the runner's keeper is the container's init and restarts a daemon
that dies: a run that kills the daemon ends neither the sandbox nor the other runs, and an
attached client resumes with every byte exactly once. On gVisor's socket channel that also
proves the client does not wait on the listener runsc's gofer keeps of the dead daemon."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox_support import backend_params

from forgehand.runner.model import Exited, Output, RunSpec
from forgehand.sandbox.backend import SandboxBackend
from forgehand.sandbox.gvisor import GVisorBackend, GVisorConfig, GVisorSandbox
from forgehand.sandbox.podman import PodmanBackend, PodmanConfig
from forgehand.sandbox.rootfs import is_mount_point
from forgehand.sandbox.spec import SandboxSpec

LINES = 200
PRINTER = f"i=0; while [ $i -lt {LINES} ]; do echo line $i; i=$((i+1)); sleep 0.01; done; exit 7"
# The daemon: the forked child with the serve command line, not the keeper. The pattern is
# split so that this script's own command line does not match it.
FIND_DAEMON = """
daemon="forgehand.runner"".cli serve"
for p in /proc/[0-9]*; do
  [ "$(cat $p/comm 2>/dev/null)" = forgehand-keep ] && continue
  case "$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)" in *"$daemon"*) echo "${p#/proc/}" ;; esac
done
"""
KILL_DAEMON = FIND_DAEMON.replace(
    'echo "${p#/proc/}"', 'kill -9 "${p#/proc/}" && echo "${p#/proc/}"'
)


def _backends() -> list[object]:
    return backend_params(
        [
            ("gvisor", lambda state: GVisorBackend(GVisorConfig(state_dir=state))),
            (
                "gvisor-exec",
                lambda state: GVisorBackend(GVisorConfig(state_dir=state, runner_channel="exec")),
            ),
            ("podman", lambda state: PodmanBackend(PodmanConfig(state_dir=state))),
        ]
    )


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fh-ocir-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    if is_mount_point(path / "work"):
        subprocess.run(["umount", "-l", str(path / "work")], check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("make", _backends())
async def test_a_killed_daemon_is_restarted_and_runs_survive(base: Path, make: object) -> None:
    assert callable(make)
    backend: SandboxBackend = make(base / "state")
    limits = {"memory_bytes": "512M", "pids": 64, "wall_time_seconds": 120}
    work = {"host_path": str(base / "work"), "size_bytes": "8M"}
    isolation = "kernel" if isinstance(backend, GVisorBackend) else "container"
    spec = SandboxSpec.model_validate({"work_dir": work, "limits": limits, "isolation": isolation})
    async with backend.create(spec) as sandbox:
        client = sandbox.client
        printer = await client.start(RunSpec(argv=("/bin/sh", "-c", PRINTER)))
        killer = await client.run(RunSpec(argv=("/bin/sh", "-c", KILL_DAEMON)))
        killed = killer.stdout.split()  # its attach lived through the restart too
        assert len(killed) == 1
        data = b""
        exited = None
        async for event in client.attach(printer):
            if isinstance(event, Output):
                data += event.data
            elif isinstance(event, Exited):
                exited = event
        expected = "".join(f"line {i}\n" for i in range(LINES)).encode()
        assert data == expected
        assert exited is not None
        assert exited.code == 7
        after = await client.run(RunSpec(argv=("/bin/sh", "-c", FIND_DAEMON)))
        assert after.ok
        assert len(after.stdout.split()) == 1
        assert after.stdout.split() != killed  # a new daemon serves
        if isinstance(sandbox, GVisorSandbox):  # the client stayed on its channel
            exec_only = sandbox.config.runner_channel == "exec"
            assert sandbox.channel == ("exec" if exec_only else "socket")
