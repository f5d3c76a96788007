"""The bubblewrap sandbox can write the directory of its runner's socket; whatever it puts
there in the socket's place, the host never follows it to another socket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from bwrap_support import NEEDS_BWRAP, scratch_dir
from sandbox_support import decoy_socket

from forgehand.runner import errors as runner_errors
from forgehand.runner.model import RunSpec
from forgehand.sandbox.bwrap_backend import RUNNER_SOCKET, BwrapBackend, BwrapBackendConfig
from forgehand.sandbox.spec import SandboxSpec

pytestmark = NEEDS_BWRAP


@pytest.fixture
def base() -> Iterator[Path]:
    yield from scratch_dir("fh-bs-")


@pytest.fixture
def decoy(base: Path) -> Iterator[Path]:
    yield from decoy_socket(base / "decoy.sock")


async def test_a_symlink_put_in_place_of_the_runner_socket_is_not_followed(
    base: Path, decoy: Path
) -> None:
    spec = SandboxSpec.model_validate(
        {"work_dir": {"host_path": str(base / "work"), "size_bytes": "16M"}}
    )
    backend = BwrapBackend(BwrapBackendConfig(state_dir=base / "state"))
    async with backend.create(spec) as sandbox:
        swap = f"mv {RUNNER_SOCKET} {RUNNER_SOCKET}.real && ln -s {decoy} {RUNNER_SOCKET}"
        swapped = await sandbox.client.run(RunSpec(argv=("sh", "-c", swap)))
        assert swapped.ok, swapped.stderr
        await sandbox.client.transport.reconnect()  # the next dial finds the symlink
        with pytest.raises(runner_errors.PermissionDenied, match="replaced its runner's socket"):
            await sandbox.client.capabilities()


async def test_the_direct_channel_is_pinned_too(base: Path, decoy: Path) -> None:
    spec = SandboxSpec.model_validate(
        {"work_dir": {"host_path": str(base / "work"), "size_bytes": "16M"}}
    )
    backend = BwrapBackend(BwrapBackendConfig(state_dir=base / "state"))
    async with backend.create(spec) as sandbox:
        connector = sandbox.client.transport.connector  # type: ignore[attr-defined]
        reached = await connector.connect_direct()  # the runner serves it inside
        assert reached is not None
        reached.close()
        direct = f"{RUNNER_SOCKET}.direct"
        swap = f"mv {direct} {direct}.real && ln -s {decoy} {direct}"
        swapped = await sandbox.client.run(RunSpec(argv=("sh", "-c", swap)))
        assert swapped.ok, swapped.stderr
        with pytest.raises(runner_errors.PermissionDenied, match="replaced its runner's socket"):
            await sandbox.client.run(RunSpec(argv=("true",)))
