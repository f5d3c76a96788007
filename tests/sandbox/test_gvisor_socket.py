"""gVisor sandboxes expose their runner's socket on the host (``--host-uds=create``): the
host dials it directly and pins it, the sandbox still reaches no host socket outside its
own mounts, and a runsc without ``create`` falls back to the exec channel.

Hostile commands are bounded: one connection attempt per target, short timeouts.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bwrap_support import scratch_dir
from sandbox_support import REPLACED, decoy_socket, needs_backend, swap_for_symlink

from forgehand.runner import errors as runner_errors
from forgehand.runner.client import ExecConnector
from forgehand.runner.model import Exited, Output, RunSpec
from forgehand.sandbox import procs, rootfs
from forgehand.sandbox.errors import BackendUnavailable
from forgehand.sandbox.gvisor import (
    GVisorBackend,
    GVisorConfig,
    check_host,
    host_uds,
    host_uds_modes,
)
from forgehand.sandbox.readonly_views import is_read_only
from forgehand.sandbox.sockets import PinnedSocketConnector
from forgehand.sandbox.spec import SandboxSpec

pytestmark = needs_backend("gvisor", lambda: check_host(GVisorConfig()))
SOCKET = f"{rootfs.SHARED_SOCKET}"
CONNECT = """
    import json, socket, sys
    out = {}
    for path in sys.argv[1:]:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        try:
            s.connect(path); out[path] = "connected"
        except OSError as e:
            out[path] = type(e).__name__
        s.close()
    print(json.dumps(out))
"""
BIND = """
    import errno, json, socket, sys
    out = {}
    for path in sys.argv[1:]:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(path); out[path] = "bound"
        except OSError as e:
            out[path] = errno.errorcode[e.errno]
    print(json.dumps(out))
"""


@pytest.fixture
def base() -> Iterator[Path]:
    yield from scratch_dir("fh-gs-")


@pytest.fixture
def decoy(base: Path) -> Iterator[Path]:
    yield from decoy_socket(base / "decoy.sock")


def make_spec(base: Path, name: str = "work", **extra: Any) -> SandboxSpec:
    limits = {"memory_bytes": "512M", "pids": 64, "wall_time_seconds": 120}
    work = {"host_path": str(base / name), "size_bytes": "8M"}
    fields = {"work_dir": work, "limits": limits, "isolation": "kernel", **extra}
    return SandboxSpec.model_validate(fields)


def backend(base: Path, **config: Any) -> GVisorBackend:
    config.setdefault("runner_channel", "socket")
    return GVisorBackend(GVisorConfig(state_dir=base / "state", **config))


async def python(sandbox: Any, code: str, *args: str) -> Any:
    argv = ("python3", "-c", textwrap.dedent(code), *args)
    result = await sandbox.client.run(RunSpec(argv=argv, cwd="/"))
    assert result.exit.code == 0, result.stderr.decode()[-2000:]
    return json.loads(result.stdout)


def test_host_uds_grants_only_what_is_asked() -> None:
    assert host_uds(connect=False, create=False) == "none"
    assert host_uds(connect=True, create=False) == "open"
    assert host_uds(connect=False, create=True) == "create"
    assert host_uds(connect=True, create=True) == "all"


FLAGS = "  -host-uds value\n    \tcontrols … Values: none|open|create|all, default: none\n"
OTHER = "  -host-uds\n    \tcontrols access\n  -overlay2 value\n    \tValues: a|create\n"


@pytest.mark.parametrize(
    ("text", "modes"),
    [(FLAGS, {"none", "open", "create", "all"}), (OTHER, set()), ("  -fsgofer-host-uds\n", set())],
)
def test_host_uds_values_are_read_from_runsc_flags(base: Path, text: str, modes: set[str]) -> None:
    fake = base / "runsc"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{text}EOF\n")
    fake.chmod(0o755)
    assert host_uds_modes(str(fake)) == modes


async def test_the_runner_is_dialled_on_its_pinned_socket(base: Path) -> None:
    async with backend(base).create(make_spec(base)) as sandbox:
        assert sandbox.channel == "socket"
        connector = sandbox.client.transport.connector  # type: ignore[attr-defined]
        assert isinstance(connector, PinnedSocketConnector)
        for name in ("runner.sock", "runner.sock.direct"):
            info = os.lstat(sandbox.directory / "sock" / name)
            assert stat.S_ISSOCK(info.st_mode)
            assert (info.st_uid, info.st_gid) == (rootfs.SANDBOX_UID, rootfs.SANDBOX_GID)
            assert stat.S_IMODE(info.st_mode) == 0o600
        direct = await connector.connect_direct()
        assert direct is not None
        direct.close()
        run_id = await sandbox.client.start(RunSpec(argv=("sh", "-c", "echo a; echo b; exit 3")))
        events = [event async for event in sandbox.client.attach(run_id)]
        assert b"".join(e.data for e in events if isinstance(e, Output)) == b"a\nb\n"
        assert [e.code for e in events if isinstance(e, Exited)] == [3]
        assert (await sandbox.client.run(RunSpec(argv=("true",)))).ok
        helpers = procs.children_mentioning(sandbox.sandbox_id, procs.snapshot())
        assert [procs.cmdline(p) for p in helpers if " exec " in procs.cmdline(p)] == []


async def test_a_symlink_put_in_place_of_the_runner_socket_is_not_followed(
    base: Path, decoy: Path
) -> None:
    async with backend(base).create(make_spec(base)) as sandbox:
        await swap_for_symlink(sandbox.client, SOCKET, decoy)
        assert (sandbox.directory / "sock" / "runner.sock").is_symlink()
        await sandbox.client.transport.reconnect()  # the next dial finds the symlink
        with pytest.raises(runner_errors.PermissionDenied, match=REPLACED):
            await sandbox.client.capabilities()


async def test_the_direct_channel_is_pinned_too(base: Path, decoy: Path) -> None:
    async with backend(base).create(make_spec(base)) as sandbox:
        await swap_for_symlink(sandbox.client, f"{SOCKET}.direct", decoy)
        with pytest.raises(runner_errors.PermissionDenied, match=REPLACED):
            await sandbox.client.run(RunSpec(argv=("true",)))


@pytest.mark.parametrize("network", ["none", "proxy"])
async def test_no_host_socket_outside_its_mounts_is_reached(
    base: Path, decoy: Path, network: str
) -> None:
    """``create`` gives no connect: with network none (``--host-uds=create``) not even a
    socket the host put in the sandbox's own work dir answers. With proxy (``all``, the
    egress proxy needs ``open``) only sockets inside its own mounts could."""
    extra: dict[str, Any] = {"network": {"mode": "proxy", "allow_hosts": ["pypi.org"]}}
    spec = make_spec(base, **(extra if network == "proxy" else {}))
    gvisor = backend(base)
    async with gvisor.create(spec) as sandbox, gvisor.create(make_spec(base, "other")) as other:
        planted = socket.socket(socket.AF_UNIX)
        planted.bind(str(sandbox.work_dir / "planted.sock"))
        os.chmod(sandbox.work_dir / "planted.sock", 0o777)
        planted.listen()
        outside = [str(decoy), str(other.directory / "sock" / "runner.sock")]
        outside.append(str(gvisor.config.runsc_root / f"runsc-{other.sandbox_id}.sock"))
        targets = [*outside, "/work/planted.sock"]
        try:
            out = await python(sandbox, CONNECT, *targets)
        finally:
            planted.close()
    assert {out[path] for path in outside} == {"FileNotFoundError"}, out
    if network == "none":
        assert out["/work/planted.sock"] == "ConnectionRefusedError"


async def test_sockets_are_made_only_in_writable_mounts(base: Path) -> None:
    """The Sentry refuses a bind in a read-only mount, and the gofer's own view of every
    read-only source is read-only in the host kernel, so it could not make one either."""
    read_only = ["/usr/x.sock", "/opt/forgehand/venv/x.sock", "/opt/forgehand/src/x.sock"]
    targets = [*read_only, "/x.sock", "/work/x.sock", f"{rootfs.SOCK_DIR}/x.sock"]
    async with backend(base).create(make_spec(base)) as sandbox:
        out = await python(sandbox, BIND, *targets)
        members = await sandbox.member_pids()
        gofers = [p for p in members if procs.cmdline(p).startswith("runsc-gofer")]
        assert len(gofers) == 1
        view = Path(f"/proc/{gofers[0]}/root")
        assert all(
            is_read_only(view / p) for p in ("usr", "opt/forgehand/venv", "opt/forgehand/src")
        )
        assert not is_read_only(view / "work")
        made = [sandbox.work_dir / "x.sock", sandbox.directory / "sock" / "x.sock"]
        assert all(stat.S_ISSOCK(os.lstat(path).st_mode) for path in made)
    assert {out[path] for path in [*read_only, "/x.sock"]} == {"EROFS"}, out
    assert out["/work/x.sock"] == out[f"{rootfs.SOCK_DIR}/x.sock"] == "bound"
    assert not Path("/usr/x.sock").exists()


FAKE_RUNSC = """#!/bin/sh
# runsc as it was before --host-uds existed: its flag list has no such flag.
[ "$1" = flags ] && exit 0
exec {runsc} "$@"
"""


@pytest.fixture
def old_runsc(base: Path) -> Path:
    path = base / "runsc"
    real = check_host(GVisorConfig()).split(" ", 1)[0]
    path.write_text(FAKE_RUNSC.format(runsc=real))
    path.chmod(0o755)
    return path


async def test_without_host_uds_create_the_exec_channel_serves(
    base: Path, old_runsc: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "forgehand.sandbox.gvisor"):
        old = backend(base, runsc=str(old_runsc), runner_channel="auto")
        async with old.create(make_spec(base)) as sandbox:
            assert sandbox.channel == "exec"
            assert isinstance(sandbox.client.transport.connector, ExecConnector)  # type: ignore[attr-defined]
            assert (await sandbox.client.run(RunSpec(argv=("true",)))).ok
            members = await sandbox.member_pids()
            assert not any("--host-uds" in procs.cmdline(p) for p in members)
            assert not (sandbox.directory / "sock").exists()
    assert "reaches its runner through `runsc exec`" in caplog.text


async def test_a_socket_channel_demanded_of_an_old_runsc_fails_closed(
    base: Path, old_runsc: Path
) -> None:
    with pytest.raises(BackendUnavailable, match="host-uds=create"):
        async with backend(base, runsc=str(old_runsc), runner_channel="socket").create(
            make_spec(base)
        ):
            pass
