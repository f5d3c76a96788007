"""Real podman containers (rootful, runc, --rootfs): the runner inside, limits, cleanup, reaping.

Hostile commands are bounded: fixed numbers of children, bounded allocations, short waits.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sandbox_support import needs_backend

from forgehand.runner import errors as runner_errors
from forgehand.runner.client import RunnerClient
from forgehand.runner.model import ExitReason, RunSpec
from forgehand.sandbox import cgroups, procs
from forgehand.sandbox.backend import BACKENDS
from forgehand.sandbox.errors import IsolationUnavailable
from forgehand.sandbox.podman import (
    PodmanBackend,
    PodmanConfig,
    SandboxState,
    check_host,
    hybrid_cgroups,
)
from forgehand.sandbox.rootfs import SANDBOX_UID, is_mount_point
from forgehand.sandbox.sockets import PinnedSocketConnector
from forgehand.sandbox.spec import SandboxSpec

pytestmark = needs_backend("podman", lambda: check_host(PodmanConfig()))


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fh-podman-", dir="/tmp"))
    yield path
    if is_mount_point(path / "work"):
        subprocess.run(["umount", str(path / "work")], check=False)
    shutil.rmtree(path)


def make_spec(base: Path, **extra: Any) -> SandboxSpec:
    limits = {"memory_bytes": "512M", "pids": 64, "wall_time_seconds": 60}
    limits |= extra.pop("limits", {})
    work = {"host_path": str(base / "work"), "size_bytes": "8M"}
    fields = {"work_dir": work, "limits": limits, "isolation": "container", **extra}
    return SandboxSpec.model_validate(fields)


def sh(script: str, **fields: Any) -> RunSpec:
    return RunSpec(argv=("/bin/sh", "-c", script), cwd="/work", **fields)


def test_registered_and_available() -> None:
    assert BACKENDS["podman"] is PodmanBackend
    status = PodmanBackend().availability()
    assert status.available
    assert status.isolation == "container"
    assert "runc" in status.detail


def test_missing_runsc_names_the_package() -> None:
    status = PodmanBackend(PodmanConfig(podman="podman-not-installed")).availability()
    assert not status.available
    assert "apt-get install -y podman runc" in status.detail


def test_hybrid_cgroups_are_told_apart(tmp_path: Path) -> None:
    busy, idle = tmp_path / "unified", tmp_path / "empty"
    for mount, controllers in ((busy, "memory pids\n"), (idle, "\n")):
        mount.mkdir()
        (mount / "cgroup.controllers").write_text(controllers)
    v1 = "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n"
    assert hybrid_cgroups(v1 + f"cgroup2 {busy} cgroup2 rw 0 0\n")
    assert not hybrid_cgroups(v1 + f"cgroup2 {idle} cgroup2 rw 0 0\n")  # v2 without controllers
    assert not hybrid_cgroups(f"cgroup2 {busy} cgroup2 rw 0 0\n")  # pure v2
    assert not hybrid_cgroups(v1)  # pure v1


def test_crun_where_it_cannot_run_is_unavailable_saying_so() -> None:
    """crun refuses a hybrid layout at `podman run`, with an error that named runc; the
    backend now says so before any start."""
    if shutil.which("crun") is None:
        pytest.skip("crun is not installed")
    status = PodmanBackend(PodmanConfig(runtime="crun")).availability()
    if hybrid_cgroups():
        assert not status.available
        assert "crun refuses this machine's hybrid cgroup layout" in status.detail
        assert "use runtime runc" in status.detail
    else:
        assert status.available, status.detail


def test_a_missing_runtime_names_its_package() -> None:
    status = PodmanBackend(PodmanConfig(runtime="no-such-runtime")).availability()
    assert not status.available
    assert "apt-get install -y no-such-runtime" in status.detail


async def test_output_is_byte_exact_with_exit_codes(base: Path) -> None:
    script = r"printf 'a\000b\377\n'; printf 'err\n' >&2; exit 3"
    async with PodmanBackend().create(make_spec(base)) as sandbox:
        result = await sandbox.client.run(sh(script))
        ok = await sandbox.client.run(sh("true"))
        assert sandbox.achieved.isolation == "container"
        assert sandbox.achieved.limits.memory_bytes == 512 << 20
    assert result.stdout == b"a\x00b\xff\n"
    assert result.stderr == b"err\n"
    assert (result.exit.code, result.exit.reason) == (3, ExitReason.EXITED)
    assert ok.exit.ok


async def test_file_rpcs_are_confined_to_the_work_dir(base: Path) -> None:
    async with PodmanBackend().create(make_spec(base)) as sandbox:
        await sandbox.client.write_file("/work/note.txt", b"hello")
        assert (sandbox.work_dir / "note.txt").read_bytes() == b"hello"
        assert await sandbox.client.read_file("/work/note.txt") == b"hello"
        for outside in ("/etc/passwd", "/work/../etc/passwd", "/opt/forgehand/src"):
            with pytest.raises(runner_errors.RunnerError):
                await sandbox.client.read_file(outside)


async def test_env_holds_only_what_was_named(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGEHAND_HOST_SECRET", "leak")
    spec = make_spec(base, env={"FOO": "bar"})
    async with PodmanBackend().create(spec) as sandbox:
        run = await sandbox.client.run(sh("env", env={"ONLY": "this"}))
        runner = await sandbox.client.run(sh("tr '\\0' '\\n' < /proc/1/environ"))
    assert sorted(run.stdout.decode().split()) == [
        "ONLY=this",
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "PWD=/work",
    ]
    names = {line.split("=", 1)[0] for line in runner.stdout.decode().split()}
    assert "FOO" in names
    assert "FORGEHAND_HOST_SECRET" not in names
    assert names <= {"FOO", "PATH", "HOME", "USER", "LANG", "TMPDIR", "PIP_CONFIG_FILE"} | {
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONPATH",
        "TERM",
        "HOSTNAME",
        "container",
    }


async def test_memory_limit_kills_the_run_with_reason_oom(base: Path) -> None:
    spec = make_spec(base, limits={"memory_bytes": "256M"})
    hog = "x = []\nfor _ in range(64):\n    x.append(bytearray(16 << 20))\n"
    async with PodmanBackend().create(spec) as sandbox:
        result = await sandbox.client.run(RunSpec(argv=("python3", "-c", hog), cwd="/work"))
        after = await sandbox.client.run(sh("echo alive"))
    assert result.exit.reason is ExitReason.OOM
    assert after.stdout == b"alive\n"


async def test_pids_limit_contains_a_bounded_fork(base: Path) -> None:
    spec = make_spec(base, limits={"pids": 24})
    forks = "n=0; for i in $(seq 60); do sleep 5 & n=$((n+1)); done 2>/dev/null; echo started"
    # The counter forks its one process before the fork loop starts, then counts with
    # builtins only: once the limit is reached, nothing else can fork.
    count = "(sleep 1; set -- /proc/[0-9]*; echo $#) & sleep 0.2"
    async with PodmanBackend().create(spec) as sandbox:
        assert sandbox.achieved.limits.pids == 24
        run = await sandbox.client.run(sh(f"{count}; ({forks}) & wait"))
    alive = int(run.stdout.split()[0])
    assert alive <= 24  # 60 sleepers were asked for; the pids cgroup refused the rest


async def test_work_dir_is_size_capped(base: Path) -> None:
    async with PodmanBackend().create(make_spec(base)) as sandbox:
        result = await sandbox.client.run(sh("dd if=/dev/zero of=/work/big bs=1M count=16"))
        tmp = await sandbox.client.run(
            sh("dd if=/dev/zero of=/tmp/big bs=1M count=16"),
        )
    assert result.exit.code != 0
    assert b"No space left on device" in result.stderr
    assert tmp.exit.ok  # /tmp has limits.disk_bytes (1 GiB by default)


async def test_wall_time_times_out_runs_and_ends_the_sandbox(base: Path) -> None:
    spec = make_spec(base, limits={"wall_time_seconds": 3})
    async with PodmanBackend().create(spec) as sandbox:
        result = await sandbox.run(["sleep", "30"])
        end = await asyncio.wait_for(sandbox.wait_ended(), 30)
    assert result.exit.reason is ExitReason.TIMEOUT
    assert end.reason is ExitReason.TIMEOUT


async def test_network_none_has_only_loopback(base: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    probe = textwrap.dedent(
        f"""
        import socket
        print(sorted(name for _, name in socket.if_nameindex()))
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=3)
            print("connected")
        except OSError as exc:
            print("refused", type(exc).__name__)
        """
    )
    try:
        async with PodmanBackend().create(make_spec(base)) as sandbox:
            result = await sandbox.client.run(RunSpec(argv=("python3", "-c", probe), cwd="/"))
    finally:
        server.close()
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "['lo']"
    assert lines[1].startswith("refused")


async def test_open_network_is_refused(base: Path) -> None:
    network = {"mode": "open", "unsafe_allow_open_network": True}
    with pytest.raises(IsolationUnavailable):
        async with PodmanBackend().create(make_spec(base, network=network)):
            pass


async def test_nothing_is_left_afterwards(base: Path) -> None:
    backend = PodmanBackend()
    async with backend.create(make_spec(base)) as sandbox:
        record = sandbox.directory
        listed = [r.sandbox_id for r in await backend.list_sandboxes()]
        assert sandbox.sandbox_id in listed
        assert podman_names() == podman_names() | {sandbox.sandbox_id}
        cgroup = podman_cgroup(sandbox.sandbox_id)
        assert cgroup.exists()
    assert sandbox.sandbox_id not in podman_names()
    assert not cgroup.exists()
    assert not record.exists()
    assert not is_mount_point(base / "work")
    assert not (base / "work").exists()
    assert sandbox.state is SandboxState.DESTROYED


async def idle_members(
    sandbox: Any,
) -> tuple[set[int], dict[int, procs.ProcessInfo], list[str]]:
    """The sandbox's processes once the start's short-lived podman calls (the watcher's
    one `podman inspect`, slow under load) have ended: (pids, process table, their names)."""
    for _ in range(200):
        pids = await sandbox.member_pids()
        table = procs.snapshot()
        comms = [table[p].comm for p in pids if p in table]
        if "podman" not in comms:
            break
        await asyncio.sleep(0.1)
    return pids, table, comms


async def test_destroy_leaves_no_process_and_no_zombie(base: Path) -> None:
    """conmon daemonizes; our subreaper must inherit and reap it, or each sandbox leaves a
    zombie under PID 1 (which does not reap on every machine). No host-side podman
    process stays while the sandbox idles: the runner is reached through its socket."""
    since = max(info.start_ticks for info in procs.snapshot().values())
    members: dict[int, int] = {}
    for _ in range(3):
        async with PodmanBackend().create(make_spec(base)) as sandbox:
            assert (await sandbox.client.run(sh("true"))).exit.ok
            await sandbox.client.transport.reconnect()  # a new channel, the same socket
            assert (await sandbox.client.run(sh("true"))).exit.ok
            pids, table, comms = await idle_members(sandbox)
            assert "conmon" in comms
            assert "podman" not in comms
            members |= {p: table[p].start_ticks for p in pids if p in table}
    assert len(members) >= 3 * 4  # subreaper, conmon, runner, keeper
    still = [procs.read_process(pid) for pid in members]
    assert [i for i in still if i is not None and i.start_ticks == members[i.pid]] == []
    zombies = [
        info
        for info in procs.snapshot().values()
        if info.state == "Z" and info.comm in ("conmon", "podman") and info.start_ticks > since
    ]
    assert zombies == []


async def test_a_symlink_in_place_of_the_runner_socket_is_not_followed(base: Path) -> None:
    """The socket's directory is writable by the sandbox; a symlink it puts there (here:
    to a host socket) is refused, not connected to as root."""
    decoy = socket.socket(socket.AF_UNIX)
    decoy.bind(str(base / "decoy.sock"))
    decoy.listen()
    async with PodmanBackend().create(make_spec(base)) as sandbox:
        socket_path = sandbox.directory / "sock" / "runner.sock"
        await sandbox.client.close()
        socket_path.unlink()
        socket_path.symlink_to(base / "decoy.sock")
        client = RunnerClient.connect(PinnedSocketConnector(socket_path, SANDBOX_UID))
        try:
            with pytest.raises(runner_errors.PermissionDenied):
                await client.capabilities()
        finally:
            await client.close()
    decoy.setblocking(False)
    with pytest.raises(BlockingIOError):
        decoy.accept()
    decoy.close()


def podman_names() -> set[str]:
    done = subprocess.run(
        ["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True
    )
    return set(done.stdout.split())


def podman_cgroup(name: str) -> Path:
    pids = cgroups.detect_hierarchies()[cgroups.Controller.PIDS]
    done = subprocess.run(
        ["podman", "inspect", "--format", "{{.State.Pid}}", name], capture_output=True, text=True
    )
    for line in Path(f"/proc/{done.stdout.strip()}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(",") or (pids.version == 2 and controllers == ""):
            return pids.mount / path.lstrip("/")
    raise AssertionError("no pids cgroup")


CRASHING_OWNER = """
import asyncio, os, sys
from forgehand.sandbox.podman import PodmanSandbox, PodmanConfig
from forgehand.sandbox.spec import SandboxSpec

async def main():
    spec = SandboxSpec.model_validate(
        {"work_dir": {"host_path": sys.argv[1], "size_bytes": "8M"}, "isolation": "container"}
    )
    sandbox = PodmanSandbox(spec, PodmanConfig())
    await sandbox.start()
    print(sandbox.sandbox_id, flush=True)
    os._exit(0)

asyncio.run(main())
"""


async def test_reap_removes_a_crashed_owners_sandbox(base: Path) -> None:
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_OWNER, str(base / "work"), stdout=subprocess.PIPE
    )
    out, _ = await owner.communicate()
    sandbox_id = out.decode().strip()
    assert sandbox_id.startswith("forgehand-")
    backend = PodmanBackend()
    leftovers = [r for r in await backend.list_sandboxes() if r.sandbox_id == sandbox_id]
    assert [r.state for r in leftovers] == ["leftover"]
    reaped = await backend.reap()
    assert sandbox_id in [r.sandbox_id for r in reaped]
    assert sandbox_id not in [r.sandbox_id for r in await backend.list_sandboxes()]
    assert not is_mount_point(base / "work")
    assert sandbox_id not in podman_names()
