"""A start cancelled while one of its tmpfs mounts lands leaves nothing mounted.

The cancel kills the `mount` command; when the mount had already happened in the kernel,
the sandbox must still unmount it. Each backend's host command runner is wrapped so
that the cancel comes exactly then: after the mount, before its caller returns. (Found
by CI: a gVisor start cancelled 20 ms in left its socket tmpfs mounted in the state dir.)
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sandbox_support import backend_params

from forgehand.sandbox import bwrap, bwrap_backend, rootfs
from forgehand.sandbox.backend import SandboxBackend
from forgehand.sandbox.bwrap_backend import BwrapBackend, BwrapBackendConfig
from forgehand.sandbox.gvisor import GVisorBackend, GVisorConfig
from forgehand.sandbox.podman import PodmanBackend, PodmanConfig
from forgehand.sandbox.rootfs import is_mount_point
from forgehand.sandbox.spec import SandboxSpec

Make = Callable[[Path], SandboxBackend]
# Where each backend runs `mount` for its tmpfs mounts (socket dir, work dir).
RUNS_MOUNT: dict[str, list[tuple[Any, str]]] = {
    "bwrap": [(bwrap_backend, "run_host"), (bwrap, "run_host")],
    "gvisor": [(rootfs, "run_host")],
    "podman": [(rootfs, "run_host")],
}


BACKENDS = backend_params(
    [
        ("bwrap", lambda state: BwrapBackend(BwrapBackendConfig(state_dir=state))),
        ("gvisor", lambda state: GVisorBackend(GVisorConfig(state_dir=state))),
        ("podman", lambda state: PodmanBackend(PodmanConfig(state_dir=state))),
    ]
)


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fh-cancel-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for leftover in sorted(path.rglob("*"), key=lambda p: -len(p.parts)):
        if leftover.is_dir() and is_mount_point(leftover):
            subprocess.run(["umount", "-l", str(leftover)], check=False)
    shutil.rmtree(path, ignore_errors=True)


def _cancelling_after_mount(
    real: Callable[..., Awaitable[Any]], mounted: list[Path], nth: int
) -> Callable[..., Awaitable[Any]]:
    async def run_host(argv: list[str], *args: Any, **kwargs: Any) -> Any:
        result = await real(argv, *args, **kwargs)
        if argv[0] == "mount" and "tmpfs" in argv:
            mounted.append(Path(argv[-1]))
            if len(mounted) == nth:
                raise asyncio.CancelledError  # as if the cancel came while `mount` ran
        return result

    return run_host


@pytest.mark.parametrize("nth", [1, 2], ids=["first-mount", "second-mount"])
@pytest.mark.parametrize("make", BACKENDS)
async def test_a_start_cancelled_as_its_mount_lands_unmounts_it(
    base: Path, make: Make, nth: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make(base / "state")
    name = backend.name
    mounted: list[Path] = []
    for module, attribute in RUNS_MOUNT[name]:
        real = getattr(module, attribute)
        monkeypatch.setattr(module, attribute, _cancelling_after_mount(real, mounted, nth))
    limits = {"memory_bytes": "256M", "pids": 64, "wall_time_seconds": 60}
    work = {"host_path": str(base / "work"), "size_bytes": "8M"}
    isolation = {"bwrap": "process", "gvisor": "kernel", "podman": "container"}[name]
    spec = SandboxSpec.model_validate({"work_dir": work, "limits": limits, "isolation": isolation})
    with pytest.raises(asyncio.CancelledError):
        async with backend.create(spec):
            pytest.fail("the start should have been cancelled")
    assert len(mounted) == nth
    assert [path for path in mounted if is_mount_point(path)] == []
    state = base / "state"
    assert await backend.list_sandboxes() == []
    assert [p for p in state.rglob("*") if is_mount_point(p)] == []
