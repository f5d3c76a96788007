"""Real bubblewrap sandboxes with real cgroups: isolation, limits and cleanup.

Hostile commands are bounded: fixed numbers of children, small allocations, short timeouts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bwrap_support import NEEDS_BWRAP

from forgehand.sandbox import cgroups
from forgehand.sandbox.bwrap import BwrapSandbox, CommandResult, ExitReason, SandboxState
from forgehand.sandbox.errors import IsolationUnavailable
from forgehand.sandbox.spec import SandboxSpec

pytestmark = NEEDS_BWRAP


@pytest.fixture
def base() -> Iterator[Path]:
    # tmp_path lives under a 0700 root directory the sandbox's host uid cannot traverse.
    path = Path(tempfile.mkdtemp(prefix="forgehand-test-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    subprocess.run(["umount", "-q", str(path / "work")], check=False)
    shutil.rmtree(path)


def make_spec(base: Path, **extra: Any) -> SandboxSpec:
    limits = {
        "memory_bytes": "256M",
        "pids": 64,
        "wall_time_seconds": 20,
        **extra.pop("limits", {}),
    }
    work = {"host_path": str(base / "work"), "size_bytes": "8M"}
    return SandboxSpec.model_validate({"work_dir": work, "limits": limits, **extra})


async def run(spec: SandboxSpec, script: str) -> CommandResult:
    async with BwrapSandbox(spec) as sandbox:
        return await sandbox.run(["/bin/sh", "-c", script])


PY_ERRNO = (
    "import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
    "print(libc.{call}, ctypes.get_errno())"
)


async def test_command_output_comes_back(base: Path) -> None:
    result = await run(make_spec(base), "echo hello; echo oops >&2; id -u; exit 3")
    assert result.stdout == b"hello\n1000\n"
    assert result.stderr == b"oops\n"
    assert (result.returncode, result.reason) == (3, ExitReason.EXITED)


async def test_host_secrets_invisible(base: Path) -> None:
    result = await run(make_spec(base), "ls /root; ls /etc/shadow; cat /etc/passwd")
    assert b"No such file" in result.stderr
    assert b"root:" not in result.stdout
    assert b"sandbox:x:1000" in result.stdout


async def test_environment_does_not_leak(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGEHAND_HOST_SECRET", "s3cret")
    result = await run(make_spec(base, env={"GREETING": "hi"}), "env")
    assert b"s3cret" not in result.stdout
    assert b"GREETING=hi\n" in result.stdout


async def test_proc_shows_only_sandbox_processes(base: Path) -> None:
    result = await run(make_spec(base), "ls /proc | grep -c '^[0-9]'")
    assert int(result.stdout) <= 5


async def test_only_loopback_interface(base: Path) -> None:
    result = await run(make_spec(base), "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert result.stdout.split() == [b"lo"]


async def test_memory_hog_is_oom_killed(base: Path) -> None:
    spec = make_spec(base, limits={"memory_bytes": "64M"})
    result = await run(spec, "exec python3 -c 'x = b\"a\" * (512 << 20)'")
    assert result.reason is ExitReason.OUT_OF_MEMORY
    assert result.returncode != 0


async def test_pids_limit_contains_bounded_forks(base: Path) -> None:
    script = (
        "import os, time\n"
        "kids, failed = [], 0\n"
        "for _ in range(40):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        failed += 1\n"
        "        continue\n"
        "    if pid == 0:\n"
        "        time.sleep(1)\n"
        "        os._exit(0)\n"
        "    kids.append(pid)\n"
        "for pid in kids:\n"
        "    os.waitpid(pid, 0)\n"
        "print(len(kids), failed)\n"
    )
    async with BwrapSandbox(make_spec(base, limits={"pids": 16})) as sandbox:
        result = await sandbox.run(["python3", "-c", script])
    started, failed = map(int, result.stdout.split())
    assert started < 16
    assert failed > 0


async def test_work_dir_size_cap(base: Path) -> None:
    result = await run(make_spec(base), "dd if=/dev/zero of=/work/big bs=1M count=32")
    assert result.returncode != 0
    assert b"No space left on device" in result.stderr


async def test_seccomp_denies_ptrace_and_user_namespaces(base: Path) -> None:
    ptrace = PY_ERRNO.format(call="ptrace(0, 0, 0, 0)")
    unshare = PY_ERRNO.format(call="unshare(0x10000000)")
    script = f"python3 -c '{ptrace}'; python3 -c '{unshare}'; unshare -U true; echo $?"
    result = await run(make_spec(base), script)
    assert result.stdout.split() == [b"-1", b"1", b"-1", b"1", b"1"]
    assert b"Operation not permitted" in result.stderr


async def test_wall_time_limit_kills(base: Path) -> None:
    spec = make_spec(base, limits={"wall_time_seconds": 1})
    started = time.monotonic()
    result = await run(spec, "sleep 60 & sleep 60")
    assert result.reason is ExitReason.TIMEOUT
    assert time.monotonic() - started < 10


async def test_output_is_truncated(base: Path) -> None:
    spec = make_spec(base, limits={"output_bytes": 1000})
    result = await run(spec, "head -c 100000 /dev/zero")
    assert result.truncated
    assert len(result.stdout) == 1000


async def test_cleanup_removes_cgroup_and_unmounts(base: Path) -> None:
    sandbox = BwrapSandbox(make_spec(base))
    async with sandbox:
        assert sandbox.cgroup is not None
        dirs = sandbox.cgroup.dirs
        process = await sandbox.spawn(["sleep", "60"])
        assert all(d.exists() for d in dirs)
    assert process.returncode is not None
    assert sandbox.state is SandboxState.CLOSED
    assert not any(d.exists() for d in dirs)
    assert not os.path.ismount(base / "work")


async def test_isolation_level_fails_closed(base: Path) -> None:
    sandbox = BwrapSandbox(make_spec(base, isolation="kernel"))
    with pytest.raises(IsolationUnavailable, match="backend=gvisor"):
        await sandbox.start()
    assert sandbox.state is SandboxState.FAILED


def test_gc_removes_group_of_dead_owner() -> None:
    hierarchies = cgroups.detect_hierarchies()
    name = f"gctest.{os.getpid()}-1"  # our pid, wrong start time: an owner that is gone
    group = cgroups.CgroupGroup(name, hierarchies)
    group.make()
    child = subprocess.Popen(["sleep", "60"])
    group.add_pid(child.pid)
    assert name in [info.name for info in cgroups.list_groups(hierarchies)]
    assert name in cgroups.gc(hierarchies)
    assert child.wait(timeout=5) == -9
    assert not any(d.exists() for d in group.dirs)
