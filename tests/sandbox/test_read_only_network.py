"""``network: proxy`` with ``read_only_methods`` on every backend: the sandbox's proxy lets
GET through and refuses POST and CONNECT, and the decision log the agent reads says why.

All traffic goes to a loopback server this test starts: the proxy's resolver maps the
test name to it, and ``allow_loopback_for_tests`` lets the proxy (on the host) connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sandbox_support import backend_params

from forgehand.sandbox.backend import SandboxBackend
from forgehand.sandbox.bwrap_backend import BwrapBackend, BwrapBackendConfig
from forgehand.sandbox.egress import StaticResolver
from forgehand.sandbox.gvisor import GVisorBackend, GVisorConfig
from forgehand.sandbox.podman import PodmanBackend, PodmanConfig
from forgehand.sandbox.runs import run_spec
from forgehand.sandbox.spec import SandboxSpec

pytestmark = pytest.mark.slow

RESOLVER = StaticResolver({"allowed.test": ["127.0.0.1"]})
LOOPBACK: dict[str, Any] = {"allow_loopback_for_tests": True, "egress_ports": ()}
BACKENDS = backend_params(
    [
        (
            "bwrap",
            lambda state: BwrapBackend(
                BwrapBackendConfig(state_dir=state, **LOOPBACK), resolver=RESOLVER
            ),
        ),
        (
            "gvisor",
            lambda state: GVisorBackend(
                GVisorConfig(state_dir=state, **LOOPBACK), resolver=RESOLVER
            ),
        ),
        (
            "podman",
            lambda state: PodmanBackend(
                PodmanConfig(state_dir=state, **LOOPBACK), resolver=RESOLVER
            ),
        ),
    ]
)


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fh-rom-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
        if line.split()[1].startswith(f"{path}/"):
            subprocess.run(["umount", "-l", line.split()[1]], check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A loopback HTTP server on the host, and the request lines it received."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head.split(b"\r\n")[0])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], seen
    server.close()
    await server.wait_closed()


PROBE = """
import json, os, socket, sys, urllib.error, urllib.request
base = sys.argv[1]
out = {}
for name, data in (("get", None), ("post", b"payload")):
    try:
        out[name] = urllib.request.urlopen(base + name, data=data, timeout=20).read().decode()
    except urllib.error.HTTPError as e:
        out[name] = [e.code, e.read().decode()]
s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
target = base.split("/")[2]
s.sendall(f"CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n".encode())
out["connect"] = s.recv(200).split(b" ")[1].decode()
s.close()
out["log"] = open(os.environ["FORGEHAND_EGRESS_LOG"]).read()
print(json.dumps(out))
"""


@pytest.mark.parametrize("make", BACKENDS)
async def test_read_only_network_lets_get_through_and_refuses_the_rest(
    make: Callable[[Path], SandboxBackend], base: Path, upstream: tuple[int, list[bytes]]
) -> None:
    port, seen = upstream
    network = {"mode": "proxy", "allow_hosts": ["allowed.test"], "read_only_methods": True}
    spec = SandboxSpec.model_validate(
        {
            "work_dir": {"host_path": str(base / "work"), "size_bytes": "16M"},
            "limits": {"memory_bytes": "512M", "wall_time_seconds": 120},
            "network": network,
        }
    )
    async with make(base / "state").create(spec) as sandbox:
        probe = ["python3", "-c", PROBE, f"http://allowed.test:{port}/"]
        result = await sandbox.client.run(run_spec(spec, probe))
    assert result.ok, result.stderr.decode()[-2000:]
    out = json.loads(result.stdout)
    assert out["get"] == "hello"
    assert out["post"][0] == 403
    assert "read-only" in out["post"][1]
    assert out["connect"] == "403"
    decisions = [json.loads(line) for line in out["log"].splitlines()]
    assert [(d["method"], d["decision"]) for d in decisions] == [
        ("GET", "allowed"),
        ("POST", "denied"),
        ("CONNECT", "denied"),
    ]
    assert "read-only" in decisions[1]["reason"]
    assert "POST" in decisions[1]["reason"]
    assert "CONNECT" in decisions[2]["reason"]
    assert seen == [b"GET /get HTTP/1.1"]  # the refused requests never left the host
