"""Network policies of the bwrap backend: none, proxy (loopback servers the test starts),
and ONE real package download through the proxy — the only outside traffic of the suite."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from bwrap_support import NEEDS_BWRAP, scratch_dir

from forgehand.sandbox.bwrap_backend import BwrapBackend, BwrapBackendConfig
from forgehand.sandbox.egress import StaticResolver
from forgehand.sandbox.egress.addresses import blocked_reason
from forgehand.sandbox.egress.config import EgressConfig
from forgehand.sandbox.spec import SandboxSpec

pytestmark = NEEDS_BWRAP


@pytest.fixture
def base() -> Iterator[Path]:
    yield from scratch_dir("fh-bn-")


def make_spec(base: Path, **extra: Any) -> SandboxSpec:
    work = {"host_path": str(base / "work"), "size_bytes": "64M"}
    limits = {"memory_bytes": "256M", "wall_time_seconds": 120}
    return SandboxSpec.model_validate({"work_dir": work, "limits": limits, **extra})


@pytest.fixture
async def http_port() -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


FETCH = """
import json, os, sys, urllib.request, urllib.error
out = {}
for url in sys.argv[1:]:
    try:
        out[url] = urllib.request.urlopen(url, timeout=10).read().decode()
    except urllib.error.HTTPError as e:
        out[url] = e.code
    except OSError as e:
        out[url] = type(e).__name__
out["log"] = open(os.environ["FORGEHAND_EGRESS_LOG"]).read()
print(json.dumps(out))
"""


async def test_proxy_lets_allowlisted_hosts_through_and_logs(base: Path, http_port: int) -> None:
    config = BwrapBackendConfig(
        state_dir=base / "state", allow_loopback_for_tests=True, egress_ports=()
    )
    resolver = StaticResolver({"allowed.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    backend = BwrapBackend(config, resolver=resolver)
    spec = make_spec(base, network={"mode": "proxy", "allow_hosts": ["allowed.test"]})
    good, bad = f"http://allowed.test:{http_port}/", f"http://other.test:{http_port}/"
    direct = f"http://127.0.0.1:{http_port}/"
    async with backend.create(spec) as sandbox:
        assert sandbox.achieved.network.mode == "proxy"
        assert sandbox.run_env["HTTPS_PROXY"] == "http://127.0.0.1:3128"
        result = await sandbox.run(["python3", "-c", FETCH, good, bad])
        # Without the proxy variables, the sandbox's own loopback has nothing listening.
        plain = await sandbox.run(["python3", "-c", FETCH, direct], env={"no_proxy": "*"})
    out = json.loads(result.stdout)
    assert out[good] == "hello"
    assert out[bad] == 403
    decisions = [json.loads(line) for line in out["log"].splitlines()]
    assert [(d["host"], d["decision"]) for d in decisions] == [
        ("allowed.test", "allowed"),
        ("other.test", "denied"),
    ]
    assert json.loads(plain.stdout)[direct] == "URLError"


async def test_no_network_has_only_loopback(base: Path) -> None:
    backend = BwrapBackend(BwrapBackendConfig(state_dir=base / "state"))
    code = "import socket; print(socket.if_nameindex())"
    async with backend.create(make_spec(base)) as sandbox:
        result = await sandbox.run(["python3", "-c", code])
        v4 = await sandbox.run(["cat", "/proc/net/route"])
        v6 = await sandbox.run(["cat", "/proc/net/ipv6_route"])
    assert result.stdout.strip() == b"[(1, 'lo')]"
    assert v4.stdout.splitlines()[1:] == []  # header only: no IPv4 route at all
    assert all(line.split()[-1] == b"lo" for line in v6.stdout.splitlines())


def test_trusted_networks_lift_only_the_address_check() -> None:
    mirror = ipaddress.ip_address("203.0.113.80")
    trusted = (ipaddress.ip_network("203.0.113.80/32"),)
    assert blocked_reason(mirror) is not None
    assert blocked_reason(mirror, trusted=trusted) is None
    assert blocked_reason(ipaddress.ip_address("203.0.113.81"), trusted=trusted) is not None
    assert blocked_reason(ipaddress.ip_address("::ffff:203.0.113.80"), trusted=trusted) is None
    with pytest.raises(ValueError, match="never trusted"):
        EgressConfig(
            socket_path=Path("/x"), decision_log_path=Path("/y"), trusted_networks=["0.0.0.0/0"]
        )
    config = EgressConfig(socket_path=Path("/x"), decision_log_path=Path("/y"))
    assert config.trusted_networks == ()


REGISTRY_HOSTS = ("pypi.org", "files.pythonhosted.org")


def _registry_networks() -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The /32s (/128s) of the registry's addresses that the proxy would refuse."""
    trusted = []
    for host in REGISTRY_HOSTS:
        try:
            infos = socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
        except OSError as exc:
            pytest.skip(f"the package registry is unreachable here ({host}: {exc})")
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if blocked_reason(address) is not None:
                trusted.append(ipaddress.ip_network(address))
    return tuple(dict.fromkeys(trusted))


def _reachable(host: str) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, 443), timeout=5):
        return True
    return False


@pytest.mark.slow
async def test_pip_download_through_the_proxy(base: Path) -> None:
    if not all(_reachable(host) for host in REGISTRY_HOSTS):
        pytest.skip("the package registry is unreachable from this machine")
    # On this machine the registries resolve into 203.0.113.0/24 (a local mirror), which
    # the proxy refuses as reserved. Trust exactly those addresses — the operator setting
    # meant for internal mirrors — and nothing else.
    trusted = _registry_networks()
    config = BwrapBackendConfig(state_dir=base / "state", trusted_networks=trusted)
    spec = make_spec(base, network={"mode": "proxy", "allow_hosts": list(REGISTRY_HOSTS)})
    command = ["python3", "-m", "pip", "download", "--no-deps", "--isolated", "-d", "dl", "six"]
    if subprocess.run(["python3", "-m", "pip", "--version"], capture_output=True).returncode:
        pytest.skip("pip is missing for /usr/bin/python3: install the `python3-pip` package")
    async with BwrapBackend(config).create(spec) as sandbox:
        result = await sandbox.run(command, timeout_seconds=90)
        files = sorted(p.name for p in (sandbox.work_dir / "dl").iterdir())
    assert result.ok, result.stderr.decode()[-2000:]
    assert len(files) == 1
    assert files[0].startswith("six-")
