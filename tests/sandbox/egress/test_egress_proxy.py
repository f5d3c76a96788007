"""The egress proxy over real unix and loopback TCP sockets."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Awaitable, Callable

import pytest
from conftest import Client, Servers

from forgehand.sandbox.egress import EgressProxy, EgressStartError, EgressStateError, ProxyState

Connect = Callable[[EgressProxy], Awaitable[Client]]
MakeProxy = Callable[..., EgressProxy]


async def _tunnel(connect: Connect, proxy: EgressProxy, target: str) -> Client:
    client = await connect(proxy)
    await client.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert await client.status() == 200
    return client


async def _echo_roundtrip(client: Client, payload: bytes = b"ping\n") -> None:
    await client.send(payload)
    assert await asyncio.wait_for(client.reader.readexactly(len(payload)), 5) == payload


async def _refused(connect: Connect, proxy: EgressProxy, request: bytes) -> tuple[int, str]:
    client = await connect(proxy)
    await client.send(request)
    status, body = await client.response()
    return status, body.decode()


async def test_connect_to_allowlisted_host_tunnels_both_ways(
    proxy: EgressProxy, connect: Connect, echo_port: int
) -> None:
    client = await _tunnel(connect, proxy, f"allowed.test:{echo_port}")
    await _echo_roundtrip(client)
    await _echo_roundtrip(client, b"x" * 200_000)


async def test_wildcard_rule_allows_subdomain(
    proxy: EgressProxy, connect: Connect, echo_port: int
) -> None:
    await _echo_roundtrip(await _tunnel(connect, proxy, f"api.wild.test:{echo_port}"))


async def test_tunnel_passes_half_close(
    proxy: EgressProxy, connect: Connect, echo_port: int
) -> None:
    client = await _tunnel(connect, proxy, f"allowed.test:{echo_port}")
    await client.send(b"last words")
    client.writer.write_eof()
    assert await asyncio.wait_for(client.reader.read(), 5) == b"last words"


async def test_host_not_on_allowlist_gets_403_and_a_log_line(
    proxy: EgressProxy, connect: Connect
) -> None:
    status, body = await _refused(connect, proxy, b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n")
    assert status == 403
    assert "evil.example" in body
    assert "not on the allowlist" in body
    assert "`network.allow` in .forgehand/config.yml" in body
    last = proxy.decisions[-1]
    assert (last.host, last.port, last.method, last.decision) == (
        "evil.example",
        443,
        "CONNECT",
        "denied",
    )


async def test_port_not_allowed_by_rule_is_denied(make_proxy: MakeProxy, connect: Connect) -> None:
    async with make_proxy(allow=["allowed.test:443"]) as proxy:
        status, body = await _refused(connect, proxy, b"CONNECT allowed.test:22 HTTP/1.1\r\n\r\n")
    assert status == 403
    assert "port 22 is not allowed" in body


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("private.test", "10.0.0.5, a private address"),
        ("metadata.test", "169.254.169.254, the cloud metadata address"),
        ("cgnat.test", "carrier-grade NAT"),
        ("mapped.test", "a private address"),
        ("mixed.test", "127.0.0.1, a loopback address"),
        ("allowed.test", "127.0.0.1, a loopback address"),
    ],
)
async def test_allowlisted_name_resolving_to_non_public_address_is_refused(
    make_proxy: MakeProxy, connect: Connect, name: str, why: str
) -> None:
    async with make_proxy(allow_loopback_for_tests=False) as proxy:
        status, body = await _refused(connect, proxy, f"CONNECT {name}:9 HTTP/1.1\r\n\r\n".encode())
        assert proxy.decisions[-1].decision == "denied"
    assert status == 403
    assert why in body
    assert "never connects" in body


async def test_loopback_option_does_not_open_private_addresses(
    proxy: EgressProxy, connect: Connect
) -> None:
    status, _ = await _refused(connect, proxy, b"CONNECT mixed.test:9 HTTP/1.1\r\n\r\n")
    assert status == 403


@pytest.mark.parametrize("target", ["127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "10.0.0.5"])
async def test_literal_ips_are_denied_unless_allowlisted(
    proxy: EgressProxy, connect: Connect, echo_port: int, target: str
) -> None:
    status, body = await _refused(
        connect, proxy, f"CONNECT {target}:{echo_port} HTTP/1.1\r\n\r\n".encode()
    )
    assert status == 403
    assert "literal IP address" in body


async def test_allowlisted_literal_loopback_is_still_refused(
    make_proxy: MakeProxy, connect: Connect, echo_port: int
) -> None:
    async with make_proxy(allow=["127.0.0.1"], allow_loopback_for_tests=False) as proxy:
        request = f"GET http://127.0.0.1:{echo_port}/ HTTP/1.1\r\n\r\n".encode()
        status, body = await _refused(connect, proxy, request)
    assert status == 403
    assert "loopback" in body


async def test_allowlisted_literal_ip_with_testing_option_connects(
    make_proxy: MakeProxy, connect: Connect, echo_port: int
) -> None:
    async with make_proxy(allow=["127.0.0.1"]) as proxy:
        await _echo_roundtrip(await _tunnel(connect, proxy, f"127.0.0.1:{echo_port}"))


async def test_plain_http_is_forwarded_without_hop_by_hop_headers(
    proxy: EgressProxy, connect: Connect, http_upstream: tuple[int, Servers]
) -> None:
    port, servers = http_upstream
    status, body = await _refused(
        connect,
        proxy,
        f"GET http://allowed.test:{port}/simple/six/?x=1 HTTP/1.1\r\nHost: wrong.example\r\n"
        "Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eDp5\r\n"
        "Connection: keep-alive\r\nAccept: */*\r\n\r\n".encode(),
    )
    assert (status, body) == (200, b"hello from upstream: GET".decode())
    head = servers.requests[0][0].decode().lower()
    assert head.startswith("get /simple/six/?x=1 http/1.1\r\n")
    assert f"host: allowed.test:{port}\r\n" in head
    assert "connection: close\r\n" in head
    assert "accept: */*" in head
    assert "proxy-" not in head
    assert "keep-alive" not in head


async def test_response_hop_by_hop_headers_are_replaced(
    proxy: EgressProxy, connect: Connect, http_upstream: tuple[int, Servers]
) -> None:
    client = await connect(proxy)
    await client.send(f"HEAD http://allowed.test:{http_upstream[0]}/ HTTP/1.1\r\n\r\n".encode())
    data = (await asyncio.wait_for(client.reader.read(), 5)).decode().lower()
    assert data.startswith("http/1.1 200 ok\r\n")
    assert "x-upstream: yes" in data
    assert "connection: close" in data
    assert "keep-alive" not in data
    assert data.endswith("\r\n\r\n")


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        ("Content-Length: 11", b"hello world"),
        ("Transfer-Encoding: chunked", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    ],
)
async def test_request_bodies_are_forwarded(
    proxy: EgressProxy,
    connect: Connect,
    http_upstream: tuple[int, Servers],
    framing: str,
    body: bytes,
) -> None:
    port, servers = http_upstream
    request = f"POST http://allowed.test:{port}/upload HTTP/1.1\r\n{framing}\r\n"
    request += "Expect: 100-continue\r\n\r\n"
    client = await connect(proxy)
    await client.send(request.encode())
    assert await client.status() == 100
    await client.send(body)
    status, answer = await client.response()
    assert (status, answer) == (200, b"hello from upstream: POST")
    assert servers.requests[0][1] == body
    assert b"expect" not in servers.requests[0][0].lower()


async def test_pipelined_request_is_not_forwarded(
    proxy: EgressProxy, connect: Connect, http_upstream: tuple[int, Servers]
) -> None:
    port, servers = http_upstream
    one = f"GET http://allowed.test:{port}/one HTTP/1.1\r\n\r\n"
    await _refused(connect, proxy, (one + one.replace("GET", "DELETE")).encode())
    assert len(servers.requests) == 1


async def test_read_only_mode(
    make_proxy: MakeProxy, connect: Connect, http_upstream: tuple[int, Servers], echo_port: int
) -> None:
    port, servers = http_upstream
    async with make_proxy(read_only=True) as proxy:
        post = f"POST http://allowed.test:{port}/ HTTP/1.1\r\nContent-Length: 1\r\n\r\nx"
        status, body = await _refused(connect, proxy, post.encode())
        assert (status, "read-only") == (403, body[body.index("read-only") :][:9])
        status, body = await _refused(
            connect, proxy, f"CONNECT allowed.test:{echo_port} HTTP/1.1\r\n\r\n".encode()
        )
        assert status == 403
        assert "inside TLS cannot be seen" in body
        get = f"GET http://allowed.test:{port}/ HTTP/1.1\r\n\r\n".encode()
        assert (await _refused(connect, proxy, get))[0] == 200
    assert [r[0].split(b" ")[0] for r in servers.requests] == [b"GET"]


MALFORMED = [
    b"garbage\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
    b"GET https://allowed.test/ HTTP/1.1\r\n\r\n",
    b"CONNECT allowed.test HTTP/1.1\r\n\r\n",
    b"CONNECT allowed.test:99999 HTTP/1.1\r\n\r\n",
    b"GET http://allowed.test/ HTTP/1.1\r\nNo colon here\r\n\r\n",
    b"POST http://allowed.test/ HTTP/1.1\r\nContent-Length: 1\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
    b"GET http://bad_host!/ HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", MALFORMED)
async def test_malformed_requests_get_400_and_the_proxy_keeps_serving(
    proxy: EgressProxy, connect: Connect, echo_port: int, request_bytes: bytes
) -> None:
    status, _ = await _refused(connect, proxy, request_bytes)
    assert status == 400
    assert proxy.decisions[-1].decision == "rejected"
    await _echo_roundtrip(await _tunnel(connect, proxy, f"allowed.test:{echo_port}"))


async def test_oversized_head_gets_400_and_the_proxy_keeps_serving(
    make_proxy: MakeProxy, connect: Connect, echo_port: int
) -> None:
    async with make_proxy(max_header_bytes=4096) as proxy:
        big = b"GET http://allowed.test/ HTTP/1.1\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
        status, body = await _refused(connect, proxy, big)
        assert status == 400
        assert "larger than 4096 bytes" in body
        await _echo_roundtrip(await _tunnel(connect, proxy, f"allowed.test:{echo_port}"))


async def test_client_closing_early_does_not_break_the_proxy(
    proxy: EgressProxy, connect: Connect, echo_port: int
) -> None:
    client = await connect(proxy)
    await client.send(b"CONNECT allowed.test:")
    await client.close()
    await _echo_roundtrip(await _tunnel(connect, proxy, f"allowed.test:{echo_port}"))


async def test_unresolvable_allowlisted_name_gets_502(
    make_proxy: MakeProxy, connect: Connect
) -> None:
    async with make_proxy(allow=["missing.test"]) as proxy:
        status, body = await _refused(connect, proxy, b"CONNECT missing.test:443 HTTP/1.1\r\n\r\n")
        assert proxy.decisions[-1].decision == "failed"
    assert status == 502
    assert "could not be resolved" in body


async def test_concurrent_connection_limit(
    make_proxy: MakeProxy, connect: Connect, echo_port: int
) -> None:
    async with make_proxy(max_connections=2) as proxy:
        first = await _tunnel(connect, proxy, f"allowed.test:{echo_port}")
        await _tunnel(connect, proxy, f"allowed.test:{echo_port}")
        status, body = await _refused(connect, proxy, b"CONNECT allowed.test:1 HTTP/1.1\r\n\r\n")
        assert status == 503
        assert "retry later" in body
        await first.close()
        await asyncio.sleep(0.1)
        await _echo_roundtrip(await _tunnel(connect, proxy, f"allowed.test:{echo_port}"))


async def test_idle_tunnel_is_closed(
    make_proxy: MakeProxy, connect: Connect, echo_port: int
) -> None:
    async with make_proxy(idle_timeout_seconds=0.3) as proxy:
        client = await _tunnel(connect, proxy, f"allowed.test:{echo_port}")
        await _echo_roundtrip(client)
        assert await asyncio.wait_for(client.reader.read(), 3) == b""


async def test_slow_request_head_is_dropped(make_proxy: MakeProxy, connect: Connect) -> None:
    async with make_proxy(header_timeout_seconds=0.3) as proxy:
        client = await connect(proxy)
        await client.send(b"CONNECT allowed")
        assert await asyncio.wait_for(client.reader.read(), 3) == b""


async def test_decision_log_records_every_decision(
    proxy: EgressProxy, connect: Connect, echo_port: int
) -> None:
    await _echo_roundtrip(await _tunnel(connect, proxy, f"allowed.test:{echo_port}"))
    await _refused(connect, proxy, b"GET http://evil.example/x HTTP/1.1\r\n\r\n")
    lines = proxy.decision_log_path.read_text().splitlines()
    allowed, denied = (json.loads(line) for line in lines)
    assert allowed["host"] == "allowed.test"
    assert allowed["port"] == echo_port
    assert allowed["method"] == "CONNECT"
    assert allowed["decision"] == "allowed"
    assert allowed["rule"] == "allowed.test"
    assert allowed["address"] == "127.0.0.1"
    assert {"time", "reason"} <= allowed.keys()
    assert (denied["host"], denied["port"], denied["method"]) == ("evil.example", 80, "GET")
    assert denied["decision"] == "denied"
    assert "not on the allowlist" in denied["reason"]
    assert [d.model_dump(mode="json") for d in proxy.decisions] == [allowed, denied]


def _state(proxy: EgressProxy) -> ProxyState:
    return proxy.state


async def test_lifecycle_socket_mode_and_cleanup(make_proxy: MakeProxy) -> None:
    proxy = make_proxy()
    assert proxy.state is ProxyState.CREATED
    async with proxy:
        assert _state(proxy) is ProxyState.RUNNING
        assert stat.S_IMODE(proxy.socket_path.stat().st_mode) == 0o600
        with pytest.raises(EgressStateError, match="create a new EgressProxy"):
            await proxy.start()
    assert _state(proxy) is ProxyState.STOPPED
    assert not proxy.socket_path.exists()


async def test_existing_socket_path_is_not_taken_over(make_proxy: MakeProxy) -> None:
    first = make_proxy()
    async with first:
        with pytest.raises(EgressStartError, match="remove the stale socket"):
            await make_proxy().start()
        assert first.socket_path.exists()


async def test_stop_closes_open_tunnels_after_the_grace_period(
    make_proxy: MakeProxy, connect: Connect, echo_port: int
) -> None:
    loop = asyncio.get_running_loop()
    async with make_proxy(shutdown_grace_seconds=0.2) as proxy:
        client = await _tunnel(connect, proxy, f"allowed.test:{echo_port}")
        started = loop.time()
    assert loop.time() - started < 2
    assert await asyncio.wait_for(client.reader.read(), 3) == b""


async def test_upstream_that_is_not_http_gives_502(
    proxy: EgressProxy, connect: Connect, echo_port: int
) -> None:
    request = f"GET http://allowed.test:{echo_port}/ HTTP/1.1\r\n\r\n".encode()
    status, body = await _refused(connect, proxy, request)
    assert status == 502
    assert "no valid HTTP response" in body
