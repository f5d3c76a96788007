"""``procs.address_spaces`` and the bench's memory sums: shared address spaces count once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from forgehand.bench.sandbox import pss_bytes
from forgehand.runner.model import RunSpec
from forgehand.sandbox import procs
from forgehand.sandbox.gvisor import GVisorBackend, GVisorConfig, check_host
from forgehand.sandbox.rootfs import is_mount_point
from forgehand.sandbox.spec import SandboxSpec


def rollup_pss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no Pss line for {pid}")


def test_one_process_is_one_address_space() -> None:
    assert procs.address_spaces([os.getpid(), os.getpid()]) == [os.getpid()]


def test_a_forked_child_has_its_own_address_space() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert procs.address_spaces([child.pid, os.getpid()]) == sorted([os.getpid(), child.pid])
        both = pss_bytes({os.getpid(), child.pid})
        assert both > pss_bytes({os.getpid()}) > 0
    finally:
        child.kill()
        child.wait()


def test_vanished_processes_count_nothing() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    assert pss_bytes({child.pid}) == 0


def _gvisor_unavailable() -> str:
    try:
        check_host(GVisorConfig())
    except Exception as exc:
        return str(exc)
    return ""


@pytest.mark.needs_root
@pytest.mark.slow
@pytest.mark.skipif(bool(_gvisor_unavailable()), reason="gvisor unavailable")
async def test_gvisor_stub_processes_are_counted_once() -> None:
    """systrap's stub processes are separate pids sharing one memory map: summing their
    ``smaps_rollup`` would count those pages once per pid."""
    base = Path(tempfile.mkdtemp(prefix="fh-procs-", dir="/tmp"))
    spec = SandboxSpec.model_validate(
        {
            "work_dir": {"host_path": str(base / "work"), "size_bytes": "8M"},
            "limits": {"memory_bytes": "512M", "pids": 64, "wall_time_seconds": 60},
            "isolation": "kernel",
        }
    )
    try:
        async with GVisorBackend().create(spec) as sandbox:
            await sandbox.client.run(RunSpec(argv=("true",), env={"PATH": "/usr/bin:/bin"}))
            pids = await sandbox.member_pids()
            spaces = procs.address_spaces(pids)
            assert len(spaces) < len(pids), "systrap shares address spaces between stubs"
            shared = set(pids) - set(spaces)  # each one's pages are already counted
            naive = sum(rollup_pss(pid) for pid in pids)
            assert pss_bytes(pids) < naive - sum(rollup_pss(pid) for pid in shared) / 2
    finally:
        if is_mount_point(base / "work"):
            subprocess.run(["umount", str(base / "work")], check=False)
        shutil.rmtree(base)
