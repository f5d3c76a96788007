"""Real gVisor sandboxes (runsc, systrap): the runner inside, limits, cleanup and reaping.

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
from sandbox_support import needs_backend, rollup_pss

from forgehand.bench.sandbox import pss_bytes
from forgehand.runner import errors as runner_errors
from forgehand.runner.model import ExitReason, RunSpec
from forgehand.sandbox import cgroups, procs
from forgehand.sandbox.backend import BACKENDS
from forgehand.sandbox.errors import IsolationUnavailable
from forgehand.sandbox.gvisor import (
    GVisorBackend,
    GVisorConfig,
    GVisorSandbox,
    SandboxState,
    check_host,
)
from forgehand.sandbox.rootfs import is_mount_point
from forgehand.sandbox.spec import SandboxSpec

pytestmark = needs_backend("gvisor", lambda: check_host(GVisorConfig()))


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fh-gvisor-", dir="/tmp"))
    yield path
    if is_mount_point(path / "work"):
        subprocess.run(["umount", str(path / "work")], check=False)
    shutil.rmtree(path)


def make_spec(base: Path, **extra: Any) -> SandboxSpec:
    limits = {"memory_bytes": "512M", "pids": 64, "wall_time_seconds": 60}
    limits |= extra.pop("limits", {})
    work = {"host_path": str(base / "work"), "size_bytes": "8M"}
    fields = {"work_dir": work, "limits": limits, "isolation": "kernel", **extra}
    return SandboxSpec.model_validate(fields)


def sh(script: str, **fields: Any) -> RunSpec:
    return RunSpec(argv=("/bin/sh", "-c", script), cwd="/work", **fields)


def test_registered_and_available() -> None:
    assert BACKENDS["gvisor"] is GVisorBackend
    status = GVisorBackend().availability()
    assert status.available
    assert status.isolation == "kernel"
    assert "runsc" in status.detail


def test_missing_runsc_names_the_package() -> None:
    status = GVisorBackend(GVisorConfig(runsc="runsc-not-installed")).availability()
    assert not status.available
    assert "bookworm-backports" in status.detail


async def test_output_is_byte_exact_with_exit_codes(base: Path) -> None:
    script = r"printf 'a\000b\377\n'; printf 'err\n' >&2; exit 3"
    async with GVisorBackend().create(make_spec(base)) as sandbox:
        result = await sandbox.client.run(sh(script))
        ok = await sandbox.client.run(sh("true"))
        assert sandbox.achieved.isolation == "kernel"
        assert sandbox.achieved.limits.memory_bytes == 512 << 20
    assert result.stdout == b"a\x00b\xff\n"
    assert result.stderr == b"err\n"
    assert (result.exit.code, result.exit.reason) == (3, ExitReason.EXITED)
    assert ok.exit.ok


async def test_file_rpcs_are_confined_to_the_work_dir(base: Path) -> None:
    async with GVisorBackend().create(make_spec(base)) as sandbox:
        await sandbox.client.write_file("/work/note.txt", b"hello")
        assert (sandbox.work_dir / "note.txt").read_bytes() == b"hello"
        assert await sandbox.client.read_file("/work/note.txt") == b"hello"
        for outside in ("/etc/passwd", "/work/../etc/passwd", "/opt/forgehand/src"):
            with pytest.raises(runner_errors.RunnerError):
                await sandbox.client.read_file(outside)


async def test_env_holds_only_what_was_named(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGEHAND_HOST_SECRET", "leak")
    spec = make_spec(base, env={"FOO": "bar"})
    async with GVisorBackend().create(spec) as sandbox:
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
    }


async def test_memory_limit_is_reported_as_oom(base: Path) -> None:
    """The kernel's OOM killer either ends the whole sandbox (usually: it picks the Sentry)
    or one gVisor stub process, which fails the run; both are reported as oom."""
    spec = make_spec(base, limits={"memory_bytes": "256M"})
    hog = "x = []\nfor _ in range(64):\n    x.append(bytearray(16 << 20))\n"
    async with GVisorBackend().create(spec) as sandbox:
        try:
            result = await sandbox.client.run(RunSpec(argv=("python3", "-c", hog), cwd="/work"))
        except runner_errors.RunnerError:
            result = None
        oom = await sandbox.oom_kills() > 0
        if result is None:
            end = await asyncio.wait_for(sandbox.wait_ended(), 60)
            assert end.reason is ExitReason.OOM
            assert sandbox.state is SandboxState.ENDED
    assert oom
    assert result is None or not result.exit.ok


async def test_pids_limit_contains_a_bounded_fork(base: Path) -> None:
    spec = make_spec(base, limits={"pids": 16})
    forks = "for i in $(seq 150); do sleep 20 & done; wait"
    async with GVisorBackend().create(spec) as sandbox:
        group = sandbox.cgroup
        assert group is not None
        limit = int((group.dir(cgroups.Controller.PIDS) / "pids.max").read_text())
        assert limit == sandbox.host_pids_max < 16 * 3 + 150
        with pytest.raises(runner_errors.RunnerError):
            await sandbox.client.run(sh(forks))
        end = await asyncio.wait_for(sandbox.wait_ended(), 60)
    assert end.reason is ExitReason.LIMIT


async def test_an_oom_kill_a_run_survived_does_not_label_a_later_end(base: Path) -> None:
    """The killer took a stub process (the run failed, the sandbox lived on, and a caller
    was told); when the pids limit later ends the sandbox, that is the reason given."""
    hog = "x = []\nwhile True:\n    x.append(bytearray(50 << 20))\n"
    spec = make_spec(base, limits={"memory_bytes": "1G", "pids": 16})
    async with GVisorBackend().create(spec) as sandbox:
        result = await sandbox.client.run(RunSpec(argv=("python3", "-c", hog), cwd="/work"))
        assert not result.exit.ok
        assert await sandbox.oom_kills() == 1
        with pytest.raises(runner_errors.RunnerError):
            await sandbox.client.run(sh("for i in $(seq 150); do sleep 20 & done; wait"))
        end = await asyncio.wait_for(sandbox.wait_ended(), 60)
    assert end.reason is ExitReason.LIMIT, end


async def test_work_dir_is_size_capped(base: Path) -> None:
    async with GVisorBackend().create(make_spec(base)) as sandbox:
        result = await sandbox.client.run(sh("dd if=/dev/zero of=/work/big bs=1M count=16"))
        tmp = await sandbox.client.run(
            sh("dd if=/dev/zero of=/tmp/big bs=1M count=16"),
        )
    assert result.exit.code != 0
    assert b"No space left on device" in result.stderr
    assert tmp.exit.ok  # /tmp has limits.disk_bytes (1 GiB by default)


async def test_wall_time_times_out_runs_and_ends_the_sandbox(base: Path) -> None:
    spec = make_spec(base, limits={"wall_time_seconds": 3})
    async with GVisorBackend().create(spec) as sandbox:
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
        async with GVisorBackend().create(make_spec(base)) as sandbox:
            result = await sandbox.client.run(RunSpec(argv=("python3", "-c", probe), cwd="/"))
    finally:
        server.close()
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "['lo']"
    assert lines[1].startswith("refused")


async def test_open_network_is_refused(base: Path) -> None:
    network = {"mode": "open", "unsafe_allow_open_network": True}
    with pytest.raises(IsolationUnavailable):
        async with GVisorBackend().create(make_spec(base, network=network)):
            pass


async def test_nothing_is_left_afterwards(base: Path) -> None:
    backend = GVisorBackend()
    async with backend.create(make_spec(base)) as sandbox:
        group = sandbox.cgroup
        assert group is not None
        dirs, record = group.dirs, sandbox.directory
        assert [r.sandbox_id for r in await backend.list_sandboxes()].count(sandbox.sandbox_id)
    state = subprocess.run(
        ["runsc", "--root", str(backend.config.runsc_root), "state", sandbox.sandbox_id],
        capture_output=True,
        check=False,
    )
    assert state.returncode != 0
    assert not any(d.exists() for d in dirs)
    assert not record.exists()
    assert not is_mount_point(base / "work")
    assert not (base / "work").exists()
    assert sandbox.state is SandboxState.DESTROYED


async def test_destroy_leaves_no_process_and_no_zombie(base: Path) -> None:
    """runsc daemonizes its sandbox and gofer; our subreaper must reap them and the systrap
    stubs, or each sandbox leaves zombies under PID 1 (which never reaps here)."""
    since = max(info.start_ticks for info in procs.snapshot().values())
    members: dict[int, int] = {}
    for _ in range(3):
        async with GVisorBackend().create(make_spec(base)) as sandbox:
            assert (await sandbox.client.run(sh("true"))).exit.ok
            pids = await sandbox.member_pids()
            table = procs.snapshot()
            assert "exe" in {table[p].comm for p in pids if p in table}
            members |= {p: table[p].start_ticks for p in pids if p in table}
    assert len(members) >= 3 * 4  # subreaper, sandbox, gofer, stubs
    still = [procs.read_process(pid) for pid in members]
    assert [i for i in still if i is not None and i.start_ticks == members[i.pid]] == []
    zombies = [
        info
        for info in procs.snapshot().values()
        if info.state == "Z" and info.comm in ("exe", "runsc") and info.start_ticks > since
    ]
    assert zombies == []


CRASHING_OWNER = """
import asyncio, os, sys
from forgehand.sandbox.gvisor import GVisorSandbox, GVisorConfig
from forgehand.sandbox.spec import SandboxSpec

async def main():
    spec = SandboxSpec.model_validate(
        {"work_dir": {"host_path": sys.argv[1], "size_bytes": "8M"}, "isolation": "kernel"}
    )
    sandbox = GVisorSandbox(spec, GVisorConfig())
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
    backend = GVisorBackend()
    leftovers = [r for r in await backend.list_sandboxes() if r.sandbox_id == sandbox_id]
    assert [r.state for r in leftovers] == ["leftover"]
    directory = backend.registry.directory(sandbox_id)
    assert is_mount_point(directory / "ro" / "0")  # a read-only view
    reaped = await backend.reap()
    assert sandbox_id in [r.sandbox_id for r in reaped]
    assert sandbox_id not in [r.sandbox_id for r in await backend.list_sandboxes()]
    assert not is_mount_point(base / "work")
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    assert [m for m in mounts if m.startswith(f"{directory}/")] == []
    names = [g.name for g in cgroups.list_groups()]
    assert not any(name.startswith(sandbox_id) for name in names)


@pytest.mark.parametrize("delay", [0.02, 0.15, 0.5])
async def test_a_cancelled_start_leaves_nothing_behind(base: Path, delay: float) -> None:
    """Cancelling a start at any point tears down what was made, and no thread still
    working when the cancel came adds files afterwards."""
    state = base / "state"
    sandbox = GVisorSandbox(make_spec(base), GVisorConfig(state_dir=state))
    starting = asyncio.create_task(sandbox.start())
    await asyncio.sleep(delay)
    starting.cancel()
    outcome = (await asyncio.gather(starting, return_exceptions=True))[0]
    if outcome is None:  # it was quicker than the cancel
        await sandbox.destroy()
    else:
        assert isinstance(outcome, asyncio.CancelledError)
    assert sandbox.state in (SandboxState.FAILED, SandboxState.DESTROYED)
    await asyncio.sleep(0.5)  # a racing thread would have written by now
    assert not state.exists() or list(state.iterdir()) == []


async def test_stub_processes_that_share_an_address_space_are_counted_once(base: Path) -> None:
    """systrap's stub processes are separate pids sharing one memory map: summing their
    ``smaps_rollup`` would count those pages once per pid (the bench's ``pss_bytes``)."""
    async with GVisorBackend().create(make_spec(base)) as sandbox:
        await sandbox.client.run(RunSpec(argv=("true",), env={"PATH": "/usr/bin:/bin"}))
        pids = await sandbox.member_pids()
        spaces = procs.address_spaces(pids)
        assert len(spaces) < len(pids), "systrap shares address spaces between stubs"
        shared = set(pids) - set(spaces)  # each one's pages are already counted
        naive = sum(rollup_pss(pid) for pid in pids)
        assert pss_bytes(pids) < naive - sum(rollup_pss(pid) for pid in shared) / 2
