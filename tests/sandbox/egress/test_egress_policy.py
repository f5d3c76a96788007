"""Pure checks: address classification, allowlist rules, configuration, request parsing."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from pydantic import ValidationError

from forgehand.sandbox.egress import DEFAULT_ALLOW, AllowRule, EgressConfig, proxy_environment
from forgehand.sandbox.egress.addresses import blocked_reason
from forgehand.sandbox.egress.errors import BadRequestError
from forgehand.sandbox.egress.httpwire import (
    parse_absolute_target,
    parse_connect_target,
    parse_request_head,
    strip_hop_by_hop,
)
from forgehand.sandbox.egress.relay import BodyKind, request_framing

BLOCKED = [
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("127.0.0.1", "loopback"),
    ("127.8.8.8", "loopback"),
    ("169.254.169.254", "metadata"),
    ("169.254.1.1", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fc00::1", "private"),
    ("fd00:ec2::254", "metadata"),
    ("ff02::1", "multicast"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:169.254.169.254", "metadata"),
    ("64:ff9b::a00:1", "private"),
    ("2002:a9fe:a9fe::1", "metadata"),
]


@pytest.mark.parametrize(("address", "why"), BLOCKED)
def test_non_public_addresses_are_blocked(address: str, why: str) -> None:
    reason = blocked_reason(ipaddress.ip_address(address))
    assert reason is not None
    assert why in reason


@pytest.mark.parametrize("address", ["8.8.8.8", "151.101.0.223", "2606:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "::ffff:127.0.0.1"])
def test_loopback_option_allows_only_loopback(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address), allow_loopback=True) is None


@pytest.mark.parametrize("address", ["10.0.0.1", "169.254.169.254", "0.0.0.0", "fe80::1"])
def test_loopback_option_keeps_blocking_the_rest(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address), allow_loopback=True) is not None


@pytest.mark.parametrize(
    ("rule", "host", "port", "expected"),
    [
        ("pypi.org", "pypi.org", 443, True),
        ("pypi.org", "evil-pypi.org", 443, False),
        ("pypi.org", "sub.pypi.org", 443, False),
        ("*.example.com", "a.example.com", 443, True),
        ("*.example.com", "a.b.example.com", 80, True),
        ("*.example.com", "example.com", 443, False),
        ("*.example.com", "badexample.com", 443, False),
        ("pypi.org:443", "pypi.org", 443, True),
        ("pypi.org:443", "pypi.org", 80, False),
        ("[2001:db8::1]:443", "2001:db8::1", 443, True),
    ],
)
def test_allow_rule_matching(rule: str, host: str, port: int, expected: bool) -> None:
    assert AllowRule.model_validate(rule).matches(host, port) is expected


def test_allow_rule_normalises_case_and_trailing_dot() -> None:
    assert AllowRule.model_validate("PyPI.org.").host == "pypi.org"


@pytest.mark.parametrize(
    "bad", ["", "*", "*.com", "exa mple.com", "a_b.com", "x.com:http", "-a.com"]
)
def test_bad_allow_rules_are_refused(bad: str) -> None:
    with pytest.raises(ValidationError):
        AllowRule.model_validate(bad)


def test_config_is_strict(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        EgressConfig(
            socket_path=tmp_path / "s",
            decision_log_path=tmp_path / "l",
            allowlist=["pypi.org"],  # type: ignore[call-arg]
        )


def test_config_defaults_are_safe(tmp_path: Path) -> None:
    config = EgressConfig(socket_path=tmp_path / "s", decision_log_path=tmp_path / "l")
    hosts = {rule.host for rule in config.allow}
    assert config.allow == DEFAULT_ALLOW
    assert {"pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "crates.io"} <= hosts
    assert {"proxy.golang.org", "repo1.maven.org", "rubygems.org", "deb.debian.org"} <= hosts
    assert config.allow_loopback_for_tests is False
    assert config.read_only is False


def test_config_fields_are_documented() -> None:
    assert all(field.description for field in EgressConfig.model_fields.values())


@pytest.mark.parametrize(
    ("target", "host", "port"),
    [
        ("Example.COM:443", "example.com", 443),
        ("[::1]:8443", "::1", 8443),
        ("1.2.3.4:22", "1.2.3.4", 22),
    ],
)
def test_connect_targets(target: str, host: str, port: int) -> None:
    parsed = parse_connect_target(target)
    assert (parsed.host, parsed.port) == (host, port)


@pytest.mark.parametrize(
    "target", ["example.com", "example.com:0", "example.com:99999", ":443", "a b:1", "::1:443"]
)
def test_bad_connect_targets(target: str) -> None:
    with pytest.raises(BadRequestError):
        parse_connect_target(target)


def test_absolute_target() -> None:
    parsed = parse_absolute_target("http://Example.com:8080/a/b?c=d#frag")
    assert (parsed.host, parsed.port, parsed.path) == ("example.com", 8080, "/a/b?c=d")
    assert parse_absolute_target("http://example.com").path == "/"


@pytest.mark.parametrize(
    "target", ["/path", "https://example.com/", "http://user:pw@example.com/", "http:///x"]
)
def test_bad_absolute_targets(target: str) -> None:
    with pytest.raises(BadRequestError):
        parse_absolute_target(target)


@pytest.mark.parametrize(
    "head",
    [
        b"GET http://a.test/ HTTP/1.1\r\n Folded: yes\r\n\r\n",
        b"GET http://a.test/ HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET http://a.test/ HTTP/2.0\r\n\r\n",
        b"GET  http://a.test/ HTTP/1.1\r\n\r\n",
        b"GET http://a.test/ HTTP/1.1\r\nX: a\rb\r\n\r\n",
    ],
)
def test_malformed_heads(head: bytes) -> None:
    with pytest.raises(BadRequestError):
        parse_request_head(head)


def test_hop_by_hop_headers_are_stripped() -> None:
    headers = [
        ("Connection", "keep-alive, X-Secret"),
        ("X-Secret", "1"),
        ("Proxy-Authorization", "Basic x"),
        ("Keep-Alive", "timeout=5"),
        ("Accept", "*/*"),
    ]
    assert strip_hop_by_hop(headers) == [("Accept", "*/*")]


@pytest.mark.parametrize(
    "headers",
    [
        [("Content-Length", "3"), ("Transfer-Encoding", "chunked")],
        [("Content-Length", "3"), ("Content-Length", "4")],
        [("Transfer-Encoding", "gzip")],
        [("Content-Length", "-1")],
    ],
)
def test_ambiguous_request_framing_is_refused(headers: list[tuple[str, str]]) -> None:
    with pytest.raises(BadRequestError):
        request_framing(headers)


def test_request_framing() -> None:
    assert request_framing([("Transfer-Encoding", "chunked")]).kind is BodyKind.CHUNKED
    assert request_framing([("Content-Length", "5")]).length == 5
    assert request_framing([]).kind is BodyKind.NONE


def test_proxy_environment() -> None:
    env = proxy_environment()
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "PIP_PROXY",
    ):
        assert env[name] == "http://127.0.0.1:3128"
    assert env["npm_config_proxy"] == env["npm_config_https_proxy"] == "http://127.0.0.1:3128"
    assert env["NO_PROXY"].startswith("localhost,127.0.0.1")
    assert proxy_environment(port=8080)["HTTPS_PROXY"] == "http://127.0.0.1:8080"
