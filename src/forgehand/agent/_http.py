"""A minimal asyncio HTTP/1.1 server and client, enough for the replay server and its proxy.

Stdlib only. Bodies are read whole (Content-Length or chunked); connections are kept alive
until the client closes them or the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import urlsplit

log = logging.getLogger(__name__)
_MAX_BODY = 64 * 1024 * 1024


@dataclass
class HttpRequest:
    """One request; header names are lower case."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HttpResponse:
    """One response; `Content-Length` and `Connection` are added when it is written."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class HttpProtocolError(Exception):
    """The peer sent something that is not HTTP/1.1 as we read it."""


class HttpServer:
    """Serves `handler` on `host`, port 0 by default; `start()` then `stop()`."""

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._handler = handler
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the server is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._host, self._port)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (HttpProtocolError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await read_request(reader)
            if request is None:
                return
            response = await self._respond(request)
            keep_alive = request.headers.get("connection", "").lower() != "close"
            writer.write(encode_response(response, keep_alive=keep_alive))
            await writer.drain()
            if not keep_alive:
                return

    async def _respond(self, request: HttpRequest) -> HttpResponse:
        try:
            return await self._handler(request)
        except Exception as exc:
            log.exception("handler failed on %s %s", request.method, request.path)
            return HttpResponse(500, f"internal error: {exc!r}".encode(), {})


async def read_request(reader: asyncio.StreamReader) -> HttpRequest | None:
    """The next request on a connection, or None when the client closed it."""
    line = await reader.readline()
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3:
        raise HttpProtocolError(f"bad request line {line!r}")
    headers = await _read_headers(reader)
    body = await _read_body(reader, headers, until_eof=False)
    return HttpRequest(method=parts[0], path=parts[1], headers=headers, body=body)


def encode_response(response: HttpResponse, *, keep_alive: bool) -> bytes:
    """The bytes of `response` on the wire."""
    reason = _reason(response.status)
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    headers = {k.lower(): v for k, v in response.headers.items()}
    headers["content-length"] = str(len(response.body))
    headers["connection"] = "keep-alive" if keep_alive else "close"
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


async def send(url: str, request: HttpRequest) -> HttpResponse:
    """Send one request to `url` (http or https) on a fresh connection and read the answer.

    Callers bound the wait with `asyncio.timeout`.
    """
    target = urlsplit(url)
    secure = target.scheme == "https"
    port = target.port or (443 if secure else 80)
    context = await asyncio.to_thread(ssl.create_default_context) if secure else None
    reader, writer = await asyncio.open_connection(target.hostname, port, ssl=context)
    try:
        writer.write(_encode_request(target.netloc, _path_of(url), request))
        await writer.drain()
        return await _read_response(reader)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _path_of(url: str) -> str:
    target = urlsplit(url)
    return (target.path or "/") + (f"?{target.query}" if target.query else "")


def _encode_request(netloc: str, path: str, request: HttpRequest) -> bytes:
    skip = {"host", "content-length", "connection", "transfer-encoding", "accept-encoding"}
    headers = {k: v for k, v in request.headers.items() if k not in skip}
    headers.update(
        {
            "host": netloc,
            "content-length": str(len(request.body)),
            "connection": "close",
            "accept-encoding": "identity",
        }
    )
    lines = [f"{request.method} {path} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body


async def _read_response(reader: asyncio.StreamReader) -> HttpResponse:
    line = await reader.readline()
    parts = line.decode("latin-1").split(maxsplit=2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise HttpProtocolError(f"bad status line {line!r}")
    headers = await _read_headers(reader)
    body = await _read_body(reader, headers, until_eof=True)
    return HttpResponse(status=int(parts[1]), body=body, headers=headers)


async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise HttpProtocolError(f"bad header line {line!r}")
        headers[name.strip().lower()] = value.strip()


async def _read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], *, until_eof: bool
) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return await _read_chunked(reader)
    length = headers.get("content-length")
    if length is not None:
        size = int(length)
        if size > _MAX_BODY:
            raise HttpProtocolError(f"body of {size} bytes is over the limit")
        return await reader.readexactly(size)
    return await reader.read(_MAX_BODY) if until_eof else b""


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks = bytearray()
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await _read_headers(reader)  # trailers
            return bytes(chunks)
        chunks += await reader.readexactly(size)
        await reader.readline()
        if len(chunks) > _MAX_BODY:
            raise HttpProtocolError("chunked body is over the limit")


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
