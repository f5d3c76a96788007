"""Typed, strict configuration of the egress proxy."""

from __future__ import annotations

import ipaddress
import os
import re
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
ALLOW_HINT = "add it to `network.allow` in .forgehand/config.yml"
TRUSTED_NETWORKS_ENV = "FORGEHAND_TRUSTED_NETWORKS"


def operator_trusted_networks() -> tuple[IPv4Network | IPv6Network, ...]:
    """OPERATOR SETTING: the networks in ``$FORGEHAND_TRUSTED_NETWORKS`` (CIDRs separated
    by commas or spaces), added to every sandbox's ``trusted_networks``: where an internal
    package mirror lives on a private or reserved address. A repository cannot set this.
    Raises ValueError naming the variable and the bad entry."""
    networks: list[IPv4Network | IPv6Network] = []
    for item in os.environ.get(TRUSTED_NETWORKS_ENV, "").replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise ValueError(
                f"${TRUSTED_NETWORKS_ENV}: {item!r} is not a network ({exc}); write CIDRs such "
                "as 203.0.113.80/32, separated by commas"
            ) from None
    return tuple(networks)


def normalize_host(host: str) -> str:
    """Lower-case a host name and drop one trailing dot; IP literals are canonicalised."""
    host = host.strip().lower().removesuffix(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def is_valid_hostname(host: str) -> bool:
    """True for a syntactically valid, normalised DNS name (letters, digits, hyphens)."""
    labels = host.split(".")
    return 0 < len(host) <= 253 and all(_LABEL.match(label) for label in labels)


def is_ip_literal(host: str) -> bool:
    """True when `host` is an IPv4 or IPv6 address rather than a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class AllowRule(BaseModel):
    """One allowlist entry: a host pattern and, optionally, the ports it may use.

    Written in YAML either as a mapping (`{host: pypi.org, ports: [443]}`) or as a
    string: `pypi.org`, `pypi.org:443`, `*.example.com`, `[2001:db8::1]:443`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    host: str
    """Exact host name (`pypi.org`), a `*.suffix` wildcard that matches every subdomain of
    the suffix but not the suffix itself (`*.pythonhosted.org`), or a literal IP address."""

    ports: tuple[int, ...] = ()
    """Ports this host may be reached on; empty means any port."""

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _parse_rule_string(value)
        return value

    @field_validator("host")
    @classmethod
    def _check_host(cls, host: str) -> str:
        host = normalize_host(host)
        name = host.removeprefix("*.")
        if is_ip_literal(host):
            return host
        if not is_valid_hostname(name) or (host.startswith("*.") and "." not in name):
            raise ValueError(f"{host!r} is not a host name, `*.suffix` wildcard or IP address")
        return host

    @field_validator("ports")
    @classmethod
    def _check_ports(cls, ports: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 0 < port < 65536 for port in ports):
            raise ValueError("ports must be between 1 and 65535")
        return ports

    @property
    def is_wildcard(self) -> bool:
        """True for a `*.suffix` rule."""
        return self.host.startswith("*.")

    def matches(self, host: str, port: int) -> bool:
        """True when this rule allows `host` (already normalised) on `port`."""
        if self.ports and port not in self.ports:
            return False
        if self.is_wildcard:
            return host.endswith(self.host[1:])
        return host == self.host

    def __str__(self) -> str:
        ports = ",".join(str(port) for port in self.ports)
        return f"{self.host}:{ports}" if ports else self.host


def _parse_rule_string(text: str) -> dict[str, Any]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not port:
        return {"host": host}
    if not port.isdigit():
        raise ValueError(f"bad port in allow rule {text!r}: write host or host:port")
    return {"host": host, "ports": (int(port),)}


_NEVER_TRUSTED = (
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
    ipaddress.ip_address("127.0.0.1"),
    ipaddress.ip_address("::1"),
)


def _registry(*hosts: str, ports: tuple[int, ...] = (443,)) -> tuple[AllowRule, ...]:
    return tuple(AllowRule(host=host, ports=ports) for host in hosts)


DEFAULT_ALLOW: tuple[AllowRule, ...] = (
    *_registry("pypi.org", "files.pythonhosted.org"),
    *_registry("registry.npmjs.org"),
    *_registry("crates.io", "static.crates.io", "index.crates.io"),
    *_registry("proxy.golang.org", "sum.golang.org"),
    *_registry("repo.maven.apache.org", "repo1.maven.org"),
    *_registry("rubygems.org", "index.rubygems.org"),
    *_registry("deb.debian.org", "security.debian.org", ports=(80, 443)),
)
"""The package registries a sandbox may reach when nothing else is configured."""


class EgressConfig(BaseModel):
    """Settings of one egress proxy (one per sandbox)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    socket_path: Path
    """Host path of the unix socket the proxy listens on (created with mode 0600; its
    directory must exist). It is bind-mounted into the sandbox for the forwarder."""

    decision_log_path: Path
    """Host path of the JSON-lines decision log; the sandbox mounts it read-only so the
    agent can read why a request was blocked. Parent directories are created."""

    allow: tuple[AllowRule, ...] = DEFAULT_ALLOW
    """Allowlist; everything else is denied. Defaults to the common package registries."""

    read_only: bool = False
    """Allow only GET, HEAD and OPTIONS over plain HTTP. CONNECT is then refused, because
    the methods sent inside a TLS tunnel cannot be seen by the proxy."""

    max_connections: int = Field(default=64, ge=1)
    """Client connections served at once; more are answered 503."""

    idle_timeout_seconds: float = Field(default=120.0, gt=0)
    """A connection with no bytes in either direction for this long is closed."""

    header_timeout_seconds: float = Field(default=15.0, gt=0)
    """Time a client has to send a complete request head."""

    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    """Time allowed to resolve a name and connect to the upstream server."""

    max_header_bytes: int = Field(default=32 * 1024, ge=1024, le=1024 * 1024)
    """Largest request or response head accepted; larger ones are answered 400 (or 502)."""

    shutdown_grace_seconds: float = Field(default=5.0, ge=0)
    """On stop, open connections get this long to finish before they are closed."""

    decisions_kept_in_memory: int = Field(default=1000, ge=1)
    """Most recent decisions kept in memory (the log file keeps all of them)."""

    allow_hint: str = ALLOW_HINT
    """Told to the client in every allowlist denial: how to allow a host."""

    trusted_networks: tuple[IPv4Network | IPv6Network, ...] = ()
    """OPERATOR SETTING, for internal mirrors: networks (CIDRs such as `203.0.113.80/32`)
    the proxy may connect to although they are private or reserved. Empty by default.
    Only lifts the address check for hosts already on the allowlist; loopback and the
    cloud metadata addresses are never trusted. Keep each entry as narrow as possible."""

    @field_validator("trusted_networks")
    @classmethod
    def _no_loopback_or_metadata(
        cls, networks: tuple[IPv4Network | IPv6Network, ...]
    ) -> tuple[IPv4Network | IPv6Network, ...]:
        for network in networks:
            if network.is_loopback or any(a in network for a in _NEVER_TRUSTED):
                raise ValueError(
                    f"{network} covers loopback or the cloud metadata address, which are "
                    "never trusted: list only the mirror's own network"
                )
        return networks

    allow_loopback_for_tests: bool = False
    """TESTING ONLY: let allowlisted names and literals reach loopback addresses (127/8,
    ::1). Never enable it for a real sandbox: it exposes the host's local services."""
