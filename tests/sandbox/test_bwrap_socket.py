"""The bubblewrap sandbox can write the directory of its runner's socket; whatever it puts
there in the socket's place, the host never follows it to another socket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from bwrap_support import NEEDS_BWRAP, scratch_dir
from sandbox_support import REPLACED, decoy_socket, swap_for_symlink

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
        await swap_for_symlink(sandbox.client, RUNNER_SOCKET, decoy)
        await sandbox.client.transport.reconnect()  # the next dial finds the symlink
        with pytest.raises(runner_errors.PermissionDenied, match=REPLACED):
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
        await swap_for_symlink(sandbox.client, f"{RUNNER_SOCKET}.direct", decoy)
        with pytest.raises(runner_errors.PermissionDenied, match=REPLACED):
            await sandbox.client.run(RunSpec(argv=("true",)))
