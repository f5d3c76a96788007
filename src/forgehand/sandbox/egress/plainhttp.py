"""Forwarding one plain-HTTP request: absolute-form in, origin-form out, one per connection."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from forgehand.sandbox.egress.errors import BadRequestError
from forgehand.sandbox.egress.httpwire import (
    Headers,
    RequestHead,
    ResponseHead,
    Target,
    header_values,
    parse_response_head,
    serialize_head,
    strip_hop_by_hop,
    text_response,
)
from forgehand.sandbox.egress.relay import (
    BodyKind,
    Stream,
    copy_body,
    request_framing,
    response_framing,
)

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _authority(target: Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == 80 else f"{host}:{target.port}"


def upstream_request_head(head: RequestHead, target: Target) -> bytes:
    """The head sent upstream: origin-form target, Host from the URL, no hop-by-hop fields,
    `Connection: close` so that one connection carries exactly one request."""
    headers: Headers = [(k, v) for k, v in strip_hop_by_hop(head.headers) if k.lower() != "host"]
    headers = [("Host", _authority(target)), *headers, ("Connection", "close")]
    return serialize_head(f"{head.method} {target.path} HTTP/1.1", headers)


def client_response_head(response: ResponseHead) -> bytes:
    """The response head sent to the client, without hop-by-hop fields, closing."""
    headers = [*strip_hop_by_hop(response.headers), ("Connection", "close")]
    return serialize_head(f"HTTP/1.1 {response.status} {response.reason}", headers)


def _wants_continue(head: RequestHead) -> bool:
    expect = [v.lower() for v in header_values(head.headers, "expect")]
    return head.version == "HTTP/1.1" and "100-continue" in expect


async def _read_final_response(upstream: Stream, idle: float) -> ResponseHead | None:
    try:
        while True:
            data = await asyncio.wait_for(upstream.reader.readuntil(b"\r\n\r\n"), idle)
            response = parse_response_head(data)
            if response.status >= 200:
                return response
    except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, BadRequestError):
        return None


def _bad_gateway(target: Target) -> bytes:
    body = f"forgehand egress proxy: {target.host}:{target.port} sent no valid HTTP response.\n"
    return text_response(HTTPStatus.BAD_GATEWAY, body)


async def forward_http(
    client: Stream, upstream: Stream, head: RequestHead, target: Target, idle: float
) -> None:
    """Send the request upstream, relay its body, then relay the final response back.

    Expect is answered here (100 Continue) rather than forwarded, and interim 1xx
    responses are dropped, so the client sees one response and then a close.
    """
    framing = request_framing(head.headers)
    if framing.kind is not BodyKind.NONE and _wants_continue(head):
        client.writer.write(_CONTINUE)
    upstream.writer.write(upstream_request_head(head, target))
    await copy_body(client.reader, upstream.writer, framing, idle)
    await upstream.writer.drain()
    response = await _read_final_response(upstream, idle)
    if response is None:
        client.writer.write(_bad_gateway(target))
        return await client.writer.drain()
    client.writer.write(client_response_head(response))
    await copy_body(
        upstream.reader,
        client.writer,
        response_framing(response.headers, response.status, head.method),
        idle,
    )
    await client.writer.drain()
