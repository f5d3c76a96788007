"""A start cancelled after any one of its host steps leaves nothing behind.

Each backend's start is a sequence of host steps: threads (``asyncio.to_thread``, also
under ``rootfs.blocking``) and host commands (``mount``, ``runsc``, ``podman``). A cancel
that arrives while one runs lets the step finish outside this process (a thread cannot be
stopped; the kernel may have mounted before ``mount`` was killed) while the caller sees
``CancelledError``. The test makes exactly that happen after step 1, then 2, … until a
start completes, and checks each time that no mount, registry record, state file,
process or cgroup is left. It found a socket tmpfs left mounted (CI saw it on gVisor, at
a 20 ms cancel) and a pinned socket descriptor lost with its thread, which kept that
tmpfs busy.
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
from sandbox_support import backend_params, tiny_image

from forgehand.sandbox import bwrap, bwrap_backend, cgroups, images, procs, rootfs
from forgehand.sandbox.backend import SandboxBackend
from forgehand.sandbox.bwrap_backend import BwrapBackend, BwrapBackendConfig
from forgehand.sandbox.gvisor import GVisorBackend, GVisorConfig
from forgehand.sandbox.podman import PodmanBackend, PodmanConfig
from forgehand.sandbox.spec import SandboxSpec

Make = Callable[[Path], SandboxBackend]
MAX_STEPS = 200
BACKENDS = backend_params(
    [
        ("bwrap", lambda state: BwrapBackend(BwrapBackendConfig(state_dir=state))),
        ("gvisor", lambda state: GVisorBackend(GVisorConfig(state_dir=state))),
        ("podman", lambda state: PodmanBackend(PodmanConfig(state_dir=state))),
    ]
)
ISOLATION = {"bwrap": "process", "gvisor": "kernel", "podman": "container"}


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fh-cancel-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    _unmount_below(path)
    shutil.rmtree(path, ignore_errors=True)


def _unmount_below(path: Path) -> None:
    for point in reversed(_mounts_below(path)):
        subprocess.run(["umount", "-l", point], check=False)


def _mounts_below(path: Path) -> list[str]:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    return [line.split()[1] for line in mounts if line.split()[1].startswith(f"{path}/")]


def _step_name(first: Any, args: tuple[Any, ...]) -> str:
    """A function's name, a host command's argv, or podman's arguments."""
    if isinstance(first, str):
        return f"{first} {' '.join(map(str, args[:2]))}"
    return getattr(first, "__qualname__", None) or " ".join(first[:2])


def _holds() -> list[str]:
    """The image roots' hold containers on this machine (``sandbox.images``)."""
    argv = ["podman", "ps", "--all", "--filter", f"label={images.HOLD_LABEL}", "--quiet"]
    return subprocess.run(argv, capture_output=True, text=True).stdout.split()


def _podman_mounted() -> str:
    return subprocess.run(["podman", "image", "mount"], capture_output=True, text=True).stdout


def _groups() -> set[Path]:
    found = set()
    for hierarchy in cgroups.detect_hierarchies().values():
        parent = hierarchy.mount / cgroups.PARENT
        if parent.is_dir():
            found |= {entry for entry in parent.iterdir() if entry.is_dir()}
    return found


class CancelAfter:
    """Wraps the host-step functions: the ``nth`` step completes, then its caller gets
    ``CancelledError``, as when a cancel arrives while the step runs."""

    def __init__(self, nth: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.nth = nth
        self.steps: list[str] = []
        self.armed = True
        wrap = self._wrap
        monkeypatch.setattr(asyncio, "to_thread", wrap(asyncio.to_thread))
        for module in (rootfs, bwrap, bwrap_backend):
            monkeypatch.setattr(module, "run_host", wrap(module.run_host))
        monkeypatch.setattr(images, "_podman", wrap(images._podman))

    def _wrap(self, real: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def step(first: Any, *args: Any, **kwargs: Any) -> Any:
            result = await real(first, *args, **kwargs)
            self.steps.append(_step_name(first, args))
            if self.armed and len(self.steps) == self.nth:
                raise asyncio.CancelledError
            return result

        return step


IMAGE = "localhost/forgehand-test-cancel-root:1"


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    with tiny_image(IMAGE) as name:
        yield name


@pytest.mark.parametrize(
    ("network", "root"), [("none", "host"), ("proxy", "host"), ("none", "image")]
)
@pytest.mark.parametrize("make", BACKENDS)
async def test_a_start_cancelled_after_any_step_leaves_nothing_behind(
    base: Path,
    make: Make,
    network: str,
    root: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """With ``network: proxy`` the start also runs the egress proxy and its forwarder;
    with ``root: image`` it mounts an image (and gives podman's mount back)."""
    name = make(base / "state").name
    groups_before = _groups()
    for nth in range(1, MAX_STEPS):
        state = base / f"state-{nth}"
        backend = make(state)
        limits = {"memory_bytes": "256M", "pids": 64, "wall_time_seconds": 60}
        work = {"host_path": str(base / f"work-{nth}"), "size_bytes": "8M"}
        fields = {"work_dir": work, "limits": limits, "isolation": ISOLATION[name]}
        if network == "proxy":
            fields["network"] = {"mode": "proxy", "allow_hosts": ["pypi.org"]}
        if root == "image":
            fields["root"] = {"type": "image", "name": request.getfixturevalue("image")}
        spec = SandboxSpec.model_validate(fields)
        with monkeypatch.context() as patch:
            cut = CancelAfter(nth, patch)
            try:
                async with backend.create(spec):
                    cut.armed = False  # started: the destroy runs uncut
            except asyncio.CancelledError:
                pass
            else:
                assert nth > 3, cut.steps  # every start has steps to cut
                return  # cut after each step of a whole start
        where = f"{name}, cancelled after step {nth} ({cut.steps[nth - 1]})"
        await asyncio.sleep(0.2)  # a step that raced the cleanup would have acted by now
        assert _mounts_below(base) == [], where
        assert await backend.list_sandboxes() == [], where
        assert not state.exists() or list(state.rglob("*")) == [], where
        assert [p for p in procs.snapshot() if str(base) in procs.cmdline(p)] == [], where
        assert _groups() <= groups_before, where
        if root == "image":
            assert IMAGE not in _podman_mounted(), f"{where}: {cut.steps}"
            assert _holds() == [], f"{where}: a hold container stayed: {cut.steps}"
    pytest.fail(f"{name}: no start completed within {MAX_STEPS} steps")
