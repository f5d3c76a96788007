"""Moving bytes: message bodies framed by HTTP/1.1 rules, and two-way tunnels."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

from forgehand.sandbox.egress.errors import BadRequestError
from forgehand.sandbox.egress.httpwire import Headers, header_values

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Stream:
    """Both halves of one connection."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class BodyKind(enum.Enum):
    """How the end of a message body is found."""

    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until_close"


@dataclass(frozen=True)
class Framing:
    """The body framing of one message."""

    kind: BodyKind
    length: int = 0


def _content_length(headers: Headers) -> int | None:
    values = {
        v.strip() for value in header_values(headers, "content-length") for v in value.split(",")
    }
    if not values:
        return None
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise BadRequestError("conflicting or malformed Content-Length")
    return int(values.pop())


def _is_chunked(headers: Headers) -> bool | None:
    codings = [
        c.strip().lower() for v in header_values(headers, "transfer-encoding") for c in v.split(",")
    ]
    if not codings:
        return None
    return codings[-1] == "chunked"


def request_framing(headers: Headers) -> Framing:
    """Framing of a request body; ambiguous framing (a smuggling vector) is refused."""
    length, chunked = _content_length(headers), _is_chunked(headers)
    if chunked is not None and (length is not None or not chunked):
        raise BadRequestError("unsupported Transfer-Encoding: send chunked or Content-Length")
    if chunked:
        return Framing(BodyKind.CHUNKED)
    return Framing(BodyKind.LENGTH, length) if length else Framing(BodyKind.NONE)


def response_framing(headers: Headers, status: int, method: str) -> Framing:
    """Framing of a response body to a request with `method`."""
    if method == "HEAD" or status < 200 or status in (204, 304):
        return Framing(BodyKind.NONE)
    chunked = _is_chunked(headers)
    if chunked is not None:
        return Framing(BodyKind.CHUNKED if chunked else BodyKind.UNTIL_CLOSE)
    length = _content_length(headers)
    return Framing(BodyKind.UNTIL_CLOSE) if length is None else Framing(BodyKind.LENGTH, length)


async def _read(reader: asyncio.StreamReader, size: int, idle: float) -> bytes:
    return await asyncio.wait_for(reader.read(size), idle)


async def _copy_exact(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int, idle: float
) -> None:
    while size > 0:
        data = await _read(reader, min(size, CHUNK), idle)
        if not data:
            raise BadRequestError("connection closed in the middle of a message body")
        writer.write(data)
        await writer.drain()
        size -= len(data)


async def _read_line(reader: asyncio.StreamReader, idle: float) -> bytes:
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n"), idle)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise BadRequestError("malformed chunked body") from exc


def _chunk_size(line: bytes) -> int:
    size = line.split(b";", 1)[0].strip()
    try:
        return int(size, 16)
    except ValueError as exc:
        raise BadRequestError(f"bad chunk size {size[:20]!r}") from exc


async def _copy_chunked(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle: float
) -> None:
    while size := _chunk_size(line := await _read_line(reader, idle)):
        writer.write(line)
        await _copy_exact(reader, writer, size + 2, idle)
    writer.write(line)
    while (trailer := await _read_line(reader, idle)) != b"\r\n":
        writer.write(trailer)
    writer.write(trailer)
    await writer.drain()


async def _copy_until_close(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle: float
) -> None:
    while data := await _read(reader, CHUNK, idle):
        writer.write(data)
        await writer.drain()


async def copy_body(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, framing: Framing, idle: float
) -> None:
    """Copy one message body; every read waits at most `idle` seconds."""
    if framing.kind is BodyKind.LENGTH:
        await _copy_exact(reader, writer, framing.length, idle)
    elif framing.kind is BodyKind.CHUNKED:
        await _copy_chunked(reader, writer, idle)
    elif framing.kind is BodyKind.UNTIL_CLOSE:
        await _copy_until_close(reader, writer, idle)


class _Activity:
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.last = self._loop.time()

    def touch(self) -> None:
        self.last = self._loop.time()

    def remaining(self, idle: float) -> float:
        return self.last + idle - self._loop.time()


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, activity: _Activity
) -> None:
    while data := await reader.read(CHUNK):
        activity.touch()
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()


async def _wait_until_done_or_idle(
    tasks: set[asyncio.Task[None]], activity: _Activity, idle: float
) -> None:
    while pending := {task for task in tasks if not task.done()}:
        if any(task.exception() for task in tasks - pending) or activity.remaining(idle) <= 0:
            return
        await asyncio.wait(
            pending, timeout=activity.remaining(idle), return_when=asyncio.FIRST_COMPLETED
        )


async def tunnel(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    idle: float,
) -> None:
    """Copy bytes both ways until both sides close, one side fails, or nothing moves for
    `idle` seconds. Half-closes are passed on."""
    activity = _Activity()
    tasks = {
        asyncio.create_task(_pump(a[0], b[1], activity)),
        asyncio.create_task(_pump(b[0], a[1], activity)),
    }
    try:
        await _wait_until_done_or_idle(tasks, activity, idle)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
