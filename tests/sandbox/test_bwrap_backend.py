"""The bubblewrap backend end to end: real bwrap, real cgroups, the real runner over its
real unix socket. Hostile programs are bounded (fixed counts, small sizes, short times)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from bwrap_support import NEEDS_BWRAP, mounts_under, scratch_dir

from forgehand.runner.keeper_launch import KEEPER_COMM, KEEPER_IN_PACKAGE, keeper_binary
from forgehand.runner.model import ExitReason
from forgehand.sandbox import cgroups
from forgehand.sandbox.backend import choose_backend
from forgehand.sandbox.bwrap_backend import (
    DAEMON_OOM_SCORE_ADJ,
    BwrapBackend,
    BwrapBackendConfig,
    BwrapRunnerSandbox,
    SandboxState,
)
from forgehand.sandbox.errors import IsolationUnavailable, SandboxLaunchError
from forgehand.sandbox.pool import SandboxPool
from forgehand.sandbox.spec import SandboxSpec

pytestmark = NEEDS_BWRAP


@pytest.fixture
def base() -> Iterator[Path]:
    yield from scratch_dir("fh-bb-")


@pytest.fixture
def backend(base: Path) -> BwrapBackend:
    return BwrapBackend(BwrapBackendConfig(state_dir=base / "state"))


def make_spec(base: Path, name: str = "work", **extra: Any) -> SandboxSpec:
    limits = {"memory_bytes": "128M", "pids": 64, "wall_time_seconds": 30}
    limits |= extra.pop("limits", {})
    work = {"host_path": str(base / name), "size_bytes": "16M"}
    return SandboxSpec.model_validate({"work_dir": work, "limits": limits, **extra})


@pytest.fixture
async def sandbox(backend: BwrapBackend, base: Path) -> AsyncIterator[BwrapRunnerSandbox]:
    async with backend.create(make_spec(base, env={"GREETING": "hi"})) as running:
        yield running


def python(code: str) -> list[str]:
    return ["python3", "-c", textwrap.dedent(code)]


async def test_runs_go_through_the_runner(sandbox: BwrapRunnerSandbox) -> None:
    result = await sandbox.run(["sh", "-c", 'printf "%s\\0" "$GREETING"; pwd; id -u >&2; exit 4'])
    assert (result.exit.reason, result.exit.code) == (ExitReason.EXITED, 4)
    assert result.stdout == b"hi\0/work\n"
    assert result.stderr == b"1000\n"


async def test_achieved_reports_what_the_kernel_applies(sandbox: BwrapRunnerSandbox) -> None:
    achieved = sandbox.achieved
    assert (achieved.backend, achieved.isolation, achieved.network.mode, achieved.root) == (
        "bwrap",
        "process",
        "none",
        "host",
    )
    # The runner's own share is added on top of the spec's limits, never taken from them.
    assert achieved.limits.memory_bytes >= 128 << 20
    assert achieved.limits.pids >= 64


async def test_keeper_starts_the_daemon_and_only_the_daemon_is_oom_protected(
    sandbox: BwrapRunnerSandbox,
) -> None:
    await sandbox.run(["true"])
    runner = {}
    for pid in await sandbox.member_pids():
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        if name != "bwrap" and b"forgehand.runner.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
            runner[name] = int(Path(f"/proc/{pid}/oom_score_adj").read_text())
    # The keeper (bwrap's command) and the daemon it started: the OOM killer may pick the
    # keeper (runs inherit its score), never the daemon. Lowering a score
    # needs CAP_SYS_RESOURCE, which root lacks on some VMs (then the daemon keeps 0).
    protected = DAEMON_OOM_SCORE_ADJ if _has_cap_sys_resource() else 0
    assert runner == {"python": protected, KEEPER_COMM: 0}


def _has_cap_sys_resource() -> bool:
    status = Path("/proc/self/status").read_text()
    effective = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    return bool(int(effective.split()[1], 16) >> 24 & 1)


async def test_runner_is_ready_without_polling(backend: BwrapBackend, base: Path) -> None:
    async with backend.create(make_spec(base)) as sandbox:
        log = (sandbox.directory / "runner.log").read_text()
        assert "serving on" in log
        assert sandbox._ready_fd == -1  # the ready pipe was read and closed


async def test_work_dir_is_shared_with_the_host(sandbox: BwrapRunnerSandbox) -> None:
    (sandbox.work_dir / "in.txt").write_text("from host")
    result = await sandbox.run(["sh", "-c", "cat in.txt; echo back > out.txt"])
    assert result.stdout == b"from host"
    assert (sandbox.work_dir / "out.txt").read_text() == "back\n"


async def test_destroy_leaves_nothing(backend: BwrapBackend, base: Path) -> None:
    async with backend.create(make_spec(base)) as sandbox:
        group = sandbox._box.cgroup if sandbox._box else None
        assert group is not None
        records = await backend.list_sandboxes()
        assert [r.sandbox_id for r in records] == [sandbox.sandbox_id]
        assert records[0].state == "running"
        pids = await sandbox.member_pids()
        assert pids
    assert sandbox.state is SandboxState.DESTROYED
    assert not any(d.exists() for d in group.dirs)
    assert not (base / "work").exists()
    assert not sandbox.directory.exists()
    assert await backend.list_sandboxes() == []
    assert not mounts_under(base)
    assert all(_dead(pid) for pid in pids)


def _dead(pid: int) -> bool:
    """Gone, or a zombie (killed processes leave the cgroup before they are reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def test_kernel_isolation_is_refused(backend: BwrapBackend, base: Path) -> None:
    with pytest.raises(IsolationUnavailable, match="gvisor"):
        async with backend.create(make_spec(base, isolation="kernel")):
            pass
    assert not (base / "state").exists() or not any((base / "state").iterdir())


async def test_runner_that_cannot_start_is_reported_with_its_stderr(base: Path) -> None:
    """A package root with the keeper but no forgehand package, and a venv without python:
    the keeper starts, its daemon cannot, and the error carries the runner's stderr."""
    fake_root = base / "empty-src"
    (fake_root / KEEPER_IN_PACKAGE).parent.mkdir(parents=True)
    shutil.copy2(keeper_binary(), fake_root / KEEPER_IN_PACKAGE)
    config = BwrapBackendConfig(
        state_dir=base / "state", package_root=fake_root, venv=Path("/usr"), runner_max_restarts=0
    )
    backend = BwrapBackend(config)
    with pytest.raises(SandboxLaunchError, match=r"runner stderr: .*cannot run the daemon"):
        async with backend.create(make_spec(base)):
            pass
    assert await backend.list_sandboxes() == []
    assert not mounts_under(base)


async def test_a_keeper_that_is_not_built_is_named(base: Path) -> None:
    fake_root = base / "empty-src"
    fake_root.mkdir()
    config = BwrapBackendConfig(state_dir=base / "state", package_root=fake_root, venv=Path("/usr"))
    backend = BwrapBackend(config)
    status = backend.availability()
    assert not status.available
    assert "scripts/build-keeper" in status.detail
    with pytest.raises(
        SandboxLaunchError, match=r"keeper .* is not built: run scripts/build-keeper"
    ):
        async with backend.create(make_spec(base)):
            pass
    assert await backend.list_sandboxes() == []
    assert not mounts_under(base)


async def test_memory_breach_ends_the_run_as_oom(sandbox: BwrapRunnerSandbox) -> None:
    result = await sandbox.run(python("x = [bytearray(16 << 20) for _ in range(64)]"))
    assert result.exit.reason is ExitReason.OOM
    assert (await sandbox.run(["true"])).ok  # the runner survived


async def test_process_limit_stops_a_bounded_fork_loop(sandbox: BwrapRunnerSandbox) -> None:
    code = """
        import os, time
        made, refused = [], 0
        for _ in range(150):
            try:
                pid = os.fork()
            except BlockingIOError:
                refused += 1
                continue
            if pid == 0:
                time.sleep(2)
                os._exit(0)
            made.append(pid)
        for pid in made:
            os.waitpid(pid, 0)
        print(len(made), refused)
    """
    result = await sandbox.run(python(code))
    made, refused = map(int, result.stdout.split())
    assert refused > 0
    assert made < 150
    assert result.exit.reason is ExitReason.EXITED


async def test_work_dir_size_cap_gives_enospc(sandbox: BwrapRunnerSandbox) -> None:
    code = """
        import errno
        written = 0
        try:
            with open("fill", "wb") as f:
                for _ in range(64):
                    f.write(b"x" * (1 << 20)); f.flush(); written += 1 << 20
        except OSError as e:
            print(errno.errorcode[e.errno], written)
    """
    result = await sandbox.run(python(code))
    name, written = result.stdout.split()
    assert name == b"ENOSPC"
    assert int(written) <= 16 << 20


async def test_output_limit_defaults_from_the_spec(backend: BwrapBackend, base: Path) -> None:
    spec = make_spec(base, limits={"output_bytes": 4096})
    async with backend.create(spec) as sandbox:
        result = await sandbox.run(python("import sys\nwhile True: sys.stdout.write('y' * 1024)"))
    assert result.exit.reason is ExitReason.LIMIT
    assert len(result.stdout) <= 4096


async def test_wall_time_ends_runs_and_the_sandbox(backend: BwrapBackend, base: Path) -> None:
    config = backend.config.model_copy(update={"wall_time_grace_seconds": 0.5})
    short = BwrapBackend(config)
    async with short.create(make_spec(base, limits={"wall_time_seconds": 1.5})) as sandbox:
        result = await sandbox.run(["sleep", "30"])
        assert result.exit.reason is ExitReason.TIMEOUT
        while sandbox.state is SandboxState.READY:
            await asyncio.sleep(0.05)
        assert sandbox.state is SandboxState.EXPIRED
        assert await sandbox.member_pids() == set()
    assert sandbox.state is SandboxState.DESTROYED


async def test_pool_hands_out_each_sandbox_once(backend: BwrapBackend, base: Path) -> None:
    spec = make_spec(base, "pool")
    seen = set()
    async with SandboxPool(backend, spec, size=2) as pool:
        await pool.wait_full()
        for _ in range(3):
            async with pool.acquire() as sandbox:
                result = await sandbox.client.run(BwrapRunnerSandbox.run_spec(sandbox, ["true"]))  # type: ignore[arg-type]
                assert result.ok
                seen.add(sandbox.sandbox_id)
            assert sandbox.state is SandboxState.DESTROYED  # type: ignore[attr-defined]
    assert len(seen) == 3
    assert await backend.list_sandboxes() == []
    assert not mounts_under(base)


REAP_SCRIPT = """
import asyncio, sys
from pathlib import Path
from forgehand.sandbox.bwrap_backend import BwrapBackend, BwrapBackendConfig
from forgehand.sandbox.spec import SandboxSpec

async def main():
    backend = BwrapBackend(BwrapBackendConfig(state_dir=Path(sys.argv[1])))
    spec = SandboxSpec.model_validate({"work_dir": {"host_path": sys.argv[2]}})
    async with backend.create(spec):
        print("ready", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_reap_destroys_what_a_dead_owner_left(backend: BwrapBackend, base: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", REAP_SCRIPT, str(base / "state"), str(base / "orphan")],
        stdout=subprocess.PIPE,
    )
    assert owner.stdout is not None
    assert owner.stdout.readline() == b"ready\n"
    [record] = await backend.list_sandboxes()
    assert record.state == "running"
    assert await backend.reap() == []  # a live owner's sandbox is left alone
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    owner.stdout.close()
    [leftover] = await backend.reap()
    assert leftover.sandbox_id == record.sandbox_id
    assert await backend.list_sandboxes() == []
    assert not mounts_under(base)
    assert not (base / "orphan").exists()
    assert not any(g.sandbox_id == record.sandbox_id for g in cgroups.list_groups())


def test_choose_backend_finds_bwrap(base: Path) -> None:
    assert choose_backend(make_spec(base), "bwrap").name == "bwrap"
