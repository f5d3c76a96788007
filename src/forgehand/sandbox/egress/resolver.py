"""Name resolution for the proxy: the system resolver, and a static fake for tests."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping, Sequence
from typing import Protocol

from forgehand.sandbox.egress.addresses import IPAddress
from forgehand.sandbox.egress.errors import ResolveError


class Resolver(Protocol):
    """Turns a host name into the addresses the proxy will check and connect to."""

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """All addresses of `host`; raises ResolveError when there are none."""
        ...


def _unique(addresses: list[IPAddress]) -> list[IPAddress]:
    return list(dict.fromkeys(addresses))


class SystemResolver:
    """Resolves with the event loop's getaddrinfo (run in its default executor)."""

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise ResolveError(f"{host} did not resolve ({exc}): check the name") from exc
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        if not addresses:
            raise ResolveError(f"{host} has no addresses: check the name")
        return _unique(addresses)


class StaticResolver:
    """A deterministic resolver backed by a fixed table; unknown names fail to resolve.

    Used by tests to map names such as `allowed.test` to loopback without real DNS.
    """

    def __init__(self, table: Mapping[str, Sequence[str]]) -> None:
        self._table = {
            name.lower(): [ipaddress.ip_address(a) for a in addrs] for name, addrs in table.items()
        }

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        addresses = self._table.get(host.lower())
        if not addresses:
            raise ResolveError(f"{host} is not in the static resolver table: add it")
        return list(addresses)
