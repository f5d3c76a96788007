"""HTTP/1.x message heads as the proxy sees them: strict parsing and small writers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

from forgehand.sandbox.egress.config import is_ip_literal, is_valid_hostname, normalize_host
from forgehand.sandbox.egress.errors import BadRequestError

Headers = list[tuple[str, str]]

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSIONS = frozenset({"HTTP/1.0", "HTTP/1.1"})
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
        "expect",
    }
)


@dataclass(frozen=True)
class RequestHead:
    """A parsed request line and its header fields."""

    method: str
    target: str
    version: str
    headers: Headers


@dataclass(frozen=True)
class ResponseHead:
    """A parsed status line and its header fields."""

    version: str
    status: int
    reason: str
    headers: Headers


@dataclass(frozen=True)
class Target:
    """Where a request goes: a normalised host, a port, and the origin-form path."""

    host: str
    port: int
    path: str = ""


def _split_head(data: bytes) -> tuple[str, list[str]]:
    if not data.endswith(b"\r\n\r\n"):
        raise BadRequestError("request head does not end with an empty line")
    text = data[:-4].decode("latin-1")
    if "\0" in text:
        raise BadRequestError("request head contains a NUL byte")
    first, *lines = text.split("\r\n")
    return first, lines


def parse_headers(lines: list[str]) -> Headers:
    """Header lines as (name, value) pairs; obs-fold, bare CR/LF and bad names are refused."""
    headers: Headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name) or "\r" in value or "\n" in value:
            raise BadRequestError(f"malformed header line {line[:60]!r}")
        headers.append((name, value.strip(" \t")))
    return headers


def parse_request_head(data: bytes) -> RequestHead:
    """Parse a complete request head (ending with CRLF CRLF)."""
    first, lines = _split_head(data)
    parts = first.split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or parts[2] not in _VERSIONS:
        raise BadRequestError(f"malformed request line {first[:80]!r}")
    if not parts[1].isascii() or not parts[1].isprintable():
        raise BadRequestError("request target is not printable ASCII")
    return RequestHead(parts[0], parts[1], parts[2], parse_headers(lines))


def parse_response_head(data: bytes) -> ResponseHead:
    """Parse a complete response head (ending with CRLF CRLF)."""
    first, lines = _split_head(data)
    version, _, rest = first.partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in _VERSIONS or len(code) != 3 or not code.isdigit():
        raise BadRequestError(f"malformed status line {first[:80]!r}")
    return ResponseHead(version, int(code), reason, parse_headers(lines))


def _checked_host(raw: str) -> str:
    host = normalize_host(raw)
    if not (is_ip_literal(host) or is_valid_hostname(host)):
        raise BadRequestError(f"{raw[:80]!r} is not a valid host name")
    return host


def _checked_port(raw: str | None, default: int | None) -> int:
    if raw is None or raw == "":
        if default is None:
            raise BadRequestError("CONNECT target needs a port: write host:port")
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise BadRequestError(f"bad port {raw[:10]!r}")
    return int(raw)


def parse_connect_target(target: str) -> Target:
    """The host and port of a CONNECT request (`host:port` or `[v6]:port`)."""
    if target.startswith("["):
        host, bracket, rest = target[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise BadRequestError(f"malformed CONNECT target {target[:80]!r}")
        return Target(_checked_host(host), _checked_port(rest[1:], None))
    host, _, port = target.rpartition(":")
    if not host or ":" in host:
        raise BadRequestError(f"malformed CONNECT target {target[:80]!r}: write host:port")
    return Target(_checked_host(host), _checked_port(port, None))


def parse_absolute_target(target: str) -> Target:
    """Host, port and origin-form path of an absolute-form `http://` request target."""
    if not target.lower().startswith("http://"):
        raise BadRequestError(
            "this is a proxy: send absolute-form http:// URLs, or CONNECT for https"
        )
    try:
        url = urlsplit(target)
        port = url.port
    except ValueError as exc:
        raise BadRequestError(f"malformed URL {target[:80]!r}: {exc}") from exc
    if url.username is not None or not url.hostname:
        raise BadRequestError(f"malformed URL {target[:80]!r}: needs a host and no user info")
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    return Target(_checked_host(url.hostname), _checked_port(str(port or ""), 80), path)


def header_values(headers: Headers, name: str) -> list[str]:
    """All values of header `name` (case-insensitive), in order."""
    return [value for key, value in headers if key.lower() == name]


def strip_hop_by_hop(headers: Headers) -> Headers:
    """Headers without hop-by-hop fields, including those named in Connection."""
    named = {
        token.strip().lower()
        for value in header_values(headers, "connection")
        for token in value.split(",")
    }
    drop = HOP_BY_HOP | named
    return [(key, value) for key, value in headers if key.lower() not in drop]


def serialize_head(first_line: str, headers: Headers) -> bytes:
    """A message head with its header fields, ending with CRLF CRLF."""
    lines = [first_line, *(f"{key}: {value}" for key, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def text_response(status: HTTPStatus, body: str) -> bytes:
    """A complete `Connection: close` response with a plain-text body."""
    payload = body.encode("utf-8")
    head = serialize_head(
        f"HTTP/1.1 {status.value} {status.phrase}",
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(payload))),
            ("Connection", "close"),
        ],
    )
    return head + payload
