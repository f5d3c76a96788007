"""The client's side of the direct attach channel (see ``forgehand.runner.direct``)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner import errors
from forgehand.runner.direct import FRAME, HELLO_CHECK_SECONDS

HEAD_BYTES = 64 * 1024  # small frames are read many at a time into this buffer
MAX_FRAME_BYTES = 512 * 1024 * 1024
T = TypeVar("T")
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


async def direct_attach(
    sock: socket.socket,
    request: pb.AttachRequest,
    deadline: float | None,
    still_listening: Callable[[], bool] | None = None,
) -> AsyncIterator[pb.AttachResponse]:
    """Attach over ``sock`` (connected, non-blocking; closed when this ends). A connection
    that ends before the last frame raises ``Unavailable``, like a cut gRPC stream, so the
    caller resumes after the last seq it saw. ``still_listening`` (None: the daemon sends
    no hello) tells whether the socket dialled is still the one at its path: asked while
    the hello is late, and a no is ``Unavailable`` too (``forgehand.runner.direct``)."""
    loop = asyncio.get_running_loop()
    end = None if deadline is None else loop.time() + deadline
    try:
        payload = request.SerializeToString()
        await _within(end, deadline, loop.sock_sendall(sock, FRAME.pack(len(payload)) + payload))
        frames = _Frames(sock)
        first = None if still_listening is None else _hello(frames, still_listening, end, deadline)
        while True:
            frame = await (first or _within(end, deadline, frames.next()))
            first = None
            try:
                response = pb.SessionResponse.FromString(frame)  # type: ignore[arg-type]
            except DecodeError:
                raise errors.Internal("the runner sent a malformed direct attach frame") from None
            if response.error_code:
                code = _STATUS_BY_NUMBER.get(response.error_code, grpc.StatusCode.UNKNOWN)
                raise errors.from_status(code, response.error_message)
            if response.HasField("response"):
                yield response.response
            if response.done:
                return
    except (ConnectionError, BrokenPipeError) as exc:
        raise errors.Unavailable(f"the direct attach connection broke ({exc})") from None
    finally:
        sock.close()


async def _hello(
    frames: _Frames, still_listening: Callable[[], bool], end: float | None, deadline: float | None
) -> memoryview:
    """The first frame (the hello), waited for while the listener dialled is still the one
    at its path, and the deadline allows."""
    loop = asyncio.get_running_loop()
    first = asyncio.ensure_future(frames.next())
    try:
        while True:
            wait = HELLO_CHECK_SECONDS
            if end is not None:
                wait = min(wait, max(0.0, end - loop.time()))
            done, _ = await asyncio.wait({first}, timeout=wait)
            if done:
                return first.result()
            if end is not None and loop.time() >= end:
                raise errors.DeadlineExceeded(f"no answer within {deadline}s")
            if not still_listening():
                raise errors.Unavailable(
                    "the runner's direct channel sent no hello, and the socket dialled is no "
                    "longer at its path: its daemon is gone (redialling)"
                )
    finally:
        first.cancel()


async def _within(end: float | None, deadline: float | None, step: Awaitable[T]) -> T:
    if end is None:
        return await step
    remaining = end - asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(step, max(0.0, remaining))
    except TimeoutError:
        raise errors.DeadlineExceeded(f"no answer within {deadline}s") from None


class _Frames:
    """Frames off a stream socket: small ones from a shared buffer, each large one read
    straight into a second buffer, reused (its bytes are copied once, by the kernel)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(HEAD_BYTES)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.large = bytearray()

    async def next(self) -> memoryview:
        """The next frame's payload; valid until the next call."""
        while self.end - self.start < FRAME.size:
            await self._fill()
        (size,) = FRAME.unpack_from(self.buf, self.start)
        if size > MAX_FRAME_BYTES:
            raise errors.Internal(f"the runner sent a direct attach frame of {size} bytes")
        first = self.start + FRAME.size
        if self.end - first >= size:
            self.start = first + size
            return self.view[first : self.start]
        if first + size <= len(self.buf):
            while self.end < first + size:
                await self._fill()
            self.start = first + size
            return self.view[first : self.start]
        if len(self.large) < size:
            self.large = bytearray(size)  # kept for the next large frame: not zeroed again
        view = memoryview(self.large)[:size]
        have = self.end - first
        view[:have] = self.view[first : self.end]
        self.start = self.end = 0
        loop = asyncio.get_running_loop()
        while have < size:
            got = await loop.sock_recv_into(self.sock, view[have:])
            if not got:
                raise _cut()
            have += got
        return view

    async def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):
            kept = self.end - self.start
            self.buf[:kept] = self.view[self.start : self.end]
            self.start, self.end = 0, kept
        got = await asyncio.get_running_loop().sock_recv_into(self.sock, self.view[self.end :])
        if not got:
            raise _cut()
        self.end += got


def _cut() -> errors.Unavailable:
    return errors.Unavailable("the runner closed the direct attach connection mid-stream")
