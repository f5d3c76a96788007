"""Byte pumps between asyncio streams (standard library only: the stdio proxy imports this
and nothing heavier, since it starts once per exec-channel connection)."""

from __future__ import annotations

import asyncio
import contextlib

PUMP_BYTES = 256 * 1024


async def pump_both(
    a_in: asyncio.StreamReader,
    a_out: asyncio.StreamWriter,
    b_in: asyncio.StreamReader,
    b_out: asyncio.StreamWriter,
) -> None:
    """Copy a→b and b→a until either side closes."""
    forward = asyncio.create_task(pump(a_in, b_out))
    backward = asyncio.create_task(pump(b_in, a_out))
    try:
        await asyncio.wait((forward, backward), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (forward, backward):
            task.cancel()
        await asyncio.gather(forward, backward, return_exceptions=True)


async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy bytes until EOF, then half-close the sink."""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await source.read(PUMP_BYTES):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
