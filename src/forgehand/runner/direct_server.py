"""The daemon's side of the direct attach channel (see ``forgehand.runner.direct``).

One task accepts; each connection is a task that reads the request, then streams
``RunnerCore.attach`` batches until the last one, the client hangs up, or the listener
closes. Bad input gets a clear status in an error frame and the connection closed; no
input from the socket can end the daemon or leak a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner import errors
from forgehand.runner.core import AttachBatch, RunnerCore
from forgehand.runner.direct import FRAME, HELLO, REQUEST_SECONDS, TAG, send_parts
from forgehand.runner.wire import session_error_parts, session_parts

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256
READ_BYTES = 64 * 1024
SEND_BUFFER_BYTES = 4 * 1024 * 1024  # a whole batch in flight: fewer wake-ups on both sides
INTERNAL_MESSAGE = "internal runner error; see its log"


class DirectListener:
    """Serves attaches on ``path`` until ``close``."""

    def __init__(self, core: RunnerCore, path: Path, max_request_bytes: int) -> None:
        self.core = core
        self.path = path
        self.max_request_bytes = max_request_bytes
        self._sock: socket.socket | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # created 0600, as the gRPC socket: only our user connects
        try:
            sock.bind(str(self.path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)

    async def close(self) -> None:
        if self._sock is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _accept(self) -> None:
        """Accept what is waiting (a reader callback: no accepted socket can be lost to a
        cancellation between the accept and its task)."""
        listener = self._sock
        if listener is None:
            return
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE and the like: pause, then try again
                log.warning("direct attach: accept failed: %s", exc)
                loop = asyncio.get_running_loop()
                loop.remove_reader(listener.fileno())
                loop.call_later(0.1, self._resume_accepting, listener)
                return
            conn.setblocking(False)
            with contextlib.suppress(OSError):  # capped at net.core.wmem_max (4 MiB here)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            try:
                conn.send(HELLO)  # into an empty send buffer: it cannot block
            except OSError:  # the client is already gone
                conn.close()
                continue
            task = asyncio.create_task(self._serve(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)
            task.add_done_callback(functools.partial(_close, conn))  # even if it never ran

    def _resume_accepting(self, listener: socket.socket) -> None:
        if self._sock is listener:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            if len(self._connections) > MAX_CONNECTIONS:
                raise errors.ResourceExhausted(
                    f"more than {MAX_CONNECTIONS} direct attaches are open: close some, "
                    "or attach over gRPC"
                )
            request = await self._read_request(conn)
            await self._until_hangup(conn, self._stream(conn, request))
        except errors.RunnerError as exc:
            with contextlib.suppress(OSError):
                await _send_frame(conn, session_error_parts(TAG, exc))
        except OSError:
            pass  # the client went away; the run goes on
        except Exception as exc:
            log.error("internal error in a direct attach", exc_info=exc)
            with contextlib.suppress(OSError):
                await _send_frame(conn, session_error_parts(TAG, errors.Internal(INTERNAL_MESSAGE)))
        finally:
            conn.close()

    async def _read_request(self, conn: socket.socket) -> pb.AttachRequest:
        loop = asyncio.get_running_loop()
        data = bytearray()
        size = -1
        try:
            async with asyncio.timeout(REQUEST_SECONDS):
                while size < 0 or len(data) < FRAME.size + size:
                    chunk = await loop.sock_recv(conn, READ_BYTES)
                    if not chunk:
                        raise errors.InvalidArgument(
                            "the connection closed inside the attach request"
                        )
                    data += chunk
                    if size < 0 and len(data) >= FRAME.size:
                        (size,) = FRAME.unpack_from(data)
                        if size > self.max_request_bytes:
                            raise errors.InvalidArgument(
                                f"the attach request is {size} bytes; the limit is "
                                f"{self.max_request_bytes}"
                            )
        except TimeoutError:
            raise errors.InvalidArgument(
                f"no whole attach request within {REQUEST_SECONDS:g}s"
            ) from None
        if len(data) > FRAME.size + size:
            raise errors.InvalidArgument("nothing may follow the attach request")
        try:
            return pb.AttachRequest.FromString(bytes(data[FRAME.size :]))
        except DecodeError:
            raise errors.InvalidArgument("the attach request is not an AttachRequest") from None

    async def _stream(self, conn: socket.socket, request: pb.AttachRequest) -> None:
        if request.HasField("start"):
            await self.core.start_for_attach(request)
        batches = self.core.attach(
            request.run_id, request.after_seq, request.wait_seconds, request.max_batch_bytes
        )
        final = False
        async with contextlib.aclosing(batches):
            async for batch in batches:
                final = batch.final
                await _send_frame(conn, session_parts(TAG, batch))
        if not final:
            await _send_frame(conn, session_parts(TAG, AttachBatch([], final=True)))

    @staticmethod
    async def _until_hangup(conn: socket.socket, streaming: Coroutine[Any, Any, None]) -> None:
        """Run the stream in this task until it ends, or until the client closes its side
        (or sends anything: a protocol violation), which ends the attach at once even
        while the run is quiet."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        hung_up = False

        def on_readable() -> None:
            nonlocal hung_up
            if not hung_up:
                hung_up = True
                task.cancel()

        fd = conn.fileno()
        loop.add_reader(fd, on_readable)
        try:
            await streaming
        except asyncio.CancelledError:
            if not hung_up or task.uncancel() > 0:
                raise  # not (only) the hang-up: the listener is closing
        finally:
            loop.remove_reader(fd)


async def _send_frame(conn: socket.socket, parts: list[bytes | memoryview]) -> None:
    size = sum(len(part) for part in parts)
    await send_parts(conn, [FRAME.pack(size), *parts])


def _close(conn: socket.socket, _task: object) -> None:
    conn.close()
