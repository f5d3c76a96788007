"""Network policy ``proxy`` behaves the same on every backend (bwrap, gVisor, podman).

The sandbox has its own network namespace with no route out; its only path is the
forwarder on 127.0.0.1:3128 inside, bridged to the host-side egress proxy through a
mounted unix socket. All traffic goes to a loopback server this test starts: the
proxy's resolver maps the test names to it, and ``allow_loopback_for_tests`` lets the
proxy (and only the proxy, on the host) connect there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from forgehand.sandbox.backend import SandboxBackend
from forgehand.sandbox.bwrap_backend import BwrapBackend, BwrapBackendConfig
from forgehand.sandbox.egress import StaticResolver
from forgehand.sandbox.gvisor import GVisorBackend, GVisorConfig
from forgehand.sandbox.podman import PodmanBackend, PodmanConfig
from forgehand.sandbox.runs import run_environment, run_spec
from forgehand.sandbox.spec import SandboxSpec

pytestmark = [
    pytest.mark.needs_root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: cgroups, tmpfs mounts, runsc"),
]

RESOLVER = StaticResolver(
    {
        "allowed.test": ["127.0.0.1"],
        "other.test": ["127.0.0.1"],
        "metadata.test": ["169.254.169.254"],
    }
)
ALLOW = ["allowed.test", "metadata.test"]


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fh-egs-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
        if line.split()[1].startswith(f"{path}/"):
            subprocess.run(["umount", "-l", line.split()[1]], check=False)
    shutil.rmtree(path, ignore_errors=True)


def make_backend(name: str, base: Path) -> SandboxBackend:
    """The backend with the test resolver and loopback upstreams allowed; skip if absent."""
    settings: dict[str, Any] = {"allow_loopback_for_tests": True, "egress_ports": ()}
    backend: SandboxBackend
    if name == "bwrap":
        config = BwrapBackendConfig(state_dir=base / "state", **settings)
        backend = BwrapBackend(config, resolver=RESOLVER)
    elif name == "gvisor":
        backend = GVisorBackend(GVisorConfig(**settings), resolver=RESOLVER)
    else:
        backend = PodmanBackend(PodmanConfig(**settings), resolver=RESOLVER)
    status = backend.availability()
    if not status.available:
        pytest.skip(f"backend {name} is unavailable: {status.detail}")
    return backend


def proxy_spec(base: Path) -> SandboxSpec:
    return SandboxSpec.model_validate(
        {
            "work_dir": {"host_path": str(base / "work"), "size_bytes": "16M"},
            "limits": {"memory_bytes": "512M", "wall_time_seconds": 120},
            "network": {"mode": "proxy", "allow_hosts": ALLOW},
        }
    )


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


FETCH = """
import json, os, sys, urllib.request, urllib.error
out = {}
for url in sys.argv[1:]:
    try:
        out[url] = urllib.request.urlopen(url, timeout=20).read().decode()
    except urllib.error.HTTPError as e:
        out[url] = e.code
    except OSError as e:
        out[url] = type(e).__name__
out["log"] = open(os.environ["FORGEHAND_EGRESS_LOG"]).read()
try:
    open(os.environ["FORGEHAND_EGRESS_LOG"], "a").write("forged")
    out["forge"] = "written"
except OSError as e:
    out["forge"] = type(e).__name__
print(json.dumps(out))
"""

CONNECT = """
import errno, json, socket, sys
out = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    s = socket.socket(); s.settimeout(5)
    try:
        s.connect((host, int(port))); out[target] = "connected"
    except socket.timeout:
        out[target] = "timeout"
    except OSError as e:
        out[target] = errno.errorcode.get(e.errno, str(e))
    finally:
        s.close()
out["interfaces"] = sorted(name for _, name in socket.if_nameindex())
print(json.dumps(out))
"""


@pytest.mark.parametrize("name", ["bwrap", "gvisor", "podman"])
async def test_proxy_is_the_only_way_out(
    name: str, base: Path, upstream: tuple[int, list[bytes]]
) -> None:
    port, seen = upstream
    backend = make_backend(name, base)
    good, bad = f"http://allowed.test:{port}/ok", f"http://other.test:{port}/no"
    metadata = "http://metadata.test/latest/meta-data/"
    host_service, cloud = f"127.0.0.1:{port}", "169.254.169.254:80"
    spec = proxy_spec(base)
    env = run_environment(spec)
    async with backend.create(spec) as sandbox:
        assert sandbox.achieved.network.mode == "proxy"
        fetch = ["python3", "-c", FETCH, good, bad, metadata]
        fetched = await sandbox.client.run(run_spec(spec, fetch))
        # Raw sockets ignore the proxy variables: straight to the host's service and to
        # the metadata address.
        connect = ["python3", "-c", CONNECT, host_service, cloud]
        direct = await sandbox.client.run(run_spec(spec, connect))
    assert env["HTTPS_PROXY"] == env["PIP_PROXY"] == env["npm_config_https_proxy"]
    assert env["HTTPS_PROXY"] == "http://127.0.0.1:3128"
    assert fetched.ok, fetched.stderr.decode()[-2000:]
    out = json.loads(fetched.stdout)
    assert out[good] == "hello"
    assert out[bad] == 403
    assert out[metadata] == 403
    decisions = [json.loads(line) for line in out["log"].splitlines()]
    assert [(d["host"], d["decision"]) for d in decisions] == [
        ("allowed.test", "allowed"),
        ("other.test", "denied"),
        ("metadata.test", "denied"),
    ]
    assert "metadata" in decisions[2]["reason"]
    assert out["forge"] in ("OSError", "PermissionError")  # the agent reads, never writes
    assert direct.ok, direct.stderr.decode()[-2000:]
    reached = json.loads(direct.stdout)
    assert reached["interfaces"] == ["lo"]
    assert reached[host_service] == "ECONNREFUSED"  # the sandbox's own, empty loopback
    assert reached[cloud] in ("ENETUNREACH", "EHOSTUNREACH")
    assert seen == [b"GET /ok HTTP/1.1"]  # only the proxied, allowed request arrived


READ_ONLY_PROBE = """
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


@pytest.mark.parametrize("name", ["bwrap", "gvisor", "podman"])
async def test_read_only_network_lets_get_through_and_refuses_the_rest(
    name: str, base: Path, upstream: tuple[int, list[bytes]]
) -> None:
    """``read_only_methods``: GET goes through; POST and CONNECT are refused, and the
    decision log the agent reads says why."""
    port, seen = upstream
    network = {"mode": "proxy", "allow_hosts": ["allowed.test"], "read_only_methods": True}
    spec = SandboxSpec.model_validate(
        {
            "work_dir": {"host_path": str(base / "work"), "size_bytes": "16M"},
            "limits": {"memory_bytes": "512M", "wall_time_seconds": 120},
            "network": network,
        }
    )
    async with make_backend(name, base).create(spec) as sandbox:
        probe = ["python3", "-c", READ_ONLY_PROBE, f"http://allowed.test:{port}/"]
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
