"""``RunnerTransport`` over a real gRPC channel, dialled through a ``Connector``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from grpc.aio import EOF  # type: ignore[attr-defined]

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner import errors
from forgehand.runner.client.connectors import Connector, DirectConnector, ListenerId
from forgehand.runner.client.direct import direct_attach
from forgehand.runner.client.transport import closing_stream
from forgehand.runner.direct import HELLO_FEATURE, REQUEST_SECONDS

SERVICE = "/forgehand.runner.v1.Runner/"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
PROBE_SECONDS = 30.0
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
T = TypeVar("T")

# How a lost connection shows up on a call: besides UNAVAILABLE, a stream cut mid-way can
# end as CANCELLED, UNKNOWN or INTERNAL with one of these in its details.
_CONNECTION_LOST = ("Socket closed", "Connection reset", "Stream removed", "GOAWAY", "RST_STREAM")


def map_error(exc: grpc.aio.AioRpcError) -> errors.RunnerError:
    code, details = exc.code(), exc.details() or ""
    if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and (
        any(marker in details for marker in _CONNECTION_LOST)
    ):
        code = grpc.StatusCode.UNAVAILABLE
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"the runner is unreachable ({details}); is it running?"
    return errors.from_status(code, details)


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


class _SessionCall:
    """One Session call: many attaches on one stream, told apart by tag.

    A reader task hands each response to its attach's queue; when the call fails, every
    open attach gets the error (``Unavailable`` for a lost connection)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        method = channel.stream_stream(
            SERVICE + "Session", _serialize, pb.SessionResponse.FromString
        )
        self._call: Any = method(None)
        self._queues: dict[int, asyncio.Queue[pb.SessionResponse | errors.RunnerError]] = {}
        self._next_tag = 1
        self._write_lock = asyncio.Lock()
        self.failure: errors.RunnerError | None = None
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        failure: errors.RunnerError = errors.Unavailable("the runner session was closed")
        try:
            while (response := await self._call.read()) is not EOF:
                queue = self._queues.get(response.tag)
                if queue is not None:
                    queue.put_nowait(response)
            failure = errors.Unavailable("the runner ended the session")
        except grpc.aio.AioRpcError as exc:
            failure = map_error(exc)
        finally:
            self.failure = failure
            for queue in self._queues.values():
                queue.put_nowait(failure)

    async def _write(self, request: pb.SessionRequest) -> None:
        async with self._write_lock:
            try:
                await self._call.write(request)
            except grpc.aio.AioRpcError as exc:
                raise map_error(exc) from None
            except asyncio.InvalidStateError:  # the call is already over
                raise self.failure or errors.Unavailable("the runner session ended") from None

    async def follow(
        self, request: pb.AttachRequest, deadline: float | None
    ) -> AsyncIterator[pb.AttachResponse]:
        if self.failure is not None:
            raise self.failure
        loop = asyncio.get_running_loop()
        end = None if deadline is None else loop.time() + deadline
        tag, self._next_tag = self._next_tag, self._next_tag + 1
        queue: asyncio.Queue[pb.SessionResponse | errors.RunnerError] = asyncio.Queue()
        self._queues[tag] = queue
        done = False
        try:
            await self._write(pb.SessionRequest(tag=tag, attach=request))
            while not done:
                item = await _get(queue, None if end is None else end - loop.time(), deadline)
                if isinstance(item, errors.RunnerError):
                    done = True
                    raise item
                done = item.done
                if item.error_code:
                    code = _STATUS_BY_NUMBER.get(item.error_code, grpc.StatusCode.UNKNOWN)
                    raise errors.from_status(code, item.error_message)
                if item.HasField("response"):
                    yield item.response
        finally:
            self._queues.pop(tag, None)
            if not done and self.failure is None:  # the caller stopped early: end the attach
                with contextlib.suppress(errors.RunnerError):
                    await self._write(pb.SessionRequest(tag=tag, cancel=True))

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


async def _close_quietly(channel: grpc.aio.Channel) -> None:
    with contextlib.suppress(Exception):
        await channel.close(grace=None)


async def _get(queue: asyncio.Queue[T], remaining: float | None, deadline: float | None) -> T:
    if remaining is None:
        return await queue.get()
    try:
        return await asyncio.wait_for(queue.get(), max(0.0, remaining))
    except TimeoutError:
        raise errors.DeadlineExceeded(f"no answer within {deadline}s") from None


class GrpcTransport:
    """One gRPC channel to a runner; redialled on ``reconnect``."""

    def __init__(self, connector: Connector, use_direct: bool = True) -> None:
        self.connector = connector
        self.use_direct = use_direct
        """Attach over the direct channel where the connector offers it (off: always gRPC)."""
        self._direct_connector = connector if isinstance(connector, DirectConnector) else None
        # (connection, made at, the listener dialled)
        self._spare: tuple[socket.socket, float, ListenerId | None] | None = None
        self._spare_task: asyncio.Task[None] | None = None
        self._redials = 0  # a spare connected across a reconnect is not kept
        self._closed = False
        self._channel: grpc.aio.Channel | None = None
        self._lock = asyncio.Lock()
        self._session: _SessionCall | None = None
        self._features: frozenset[str] | None = None  # learnt from Capabilities, once
        self._closing: set[asyncio.Task[None]] = set()

    async def _open(self) -> grpc.aio.Channel:
        if self._channel is not None:
            return self._channel
        async with self._lock:
            return await self._dial()

    async def _dial(self) -> grpc.aio.Channel:
        if self._channel is None:
            dial = await self.connector.dial()
            options = [
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.http2.lookahead_bytes", 16 * 1024 * 1024),
                # Its own connection: from the global pool, a channel dialled after a cut
                # could get a connection stuck in its reconnect backoff (a second or more).
                ("grpc.use_local_subchannel_pool", 1),
                *dial.options,
            ]
            if dial.credentials is None:
                self._channel = grpc.aio.insecure_channel(dial.target, options=options)
            else:
                self._channel = grpc.aio.secure_channel(
                    dial.target, dial.credentials, options=options
                )
        return self._channel

    async def _unary(self, method: str, request: Any, response: Any, deadline: float | None) -> Any:
        channel = await self._open()
        call = channel.unary_unary(SERVICE + method, _serialize, response.FromString)
        try:
            return await call(request, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            raise map_error(exc) from None

    async def _stream(
        self, method: str, request: Any, response: Any, deadline: float | None
    ) -> AsyncIterator[Any]:
        channel = await self._open()
        call = channel.unary_stream(SERVICE + method, _serialize, response.FromString)(
            request, timeout=deadline
        )
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as exc:
            raise map_error(exc) from None
        finally:
            call.cancel()

    async def capabilities(self, deadline: float | None) -> pb.CapabilitiesResponse:
        result: pb.CapabilitiesResponse = await self._unary(
            "Capabilities", pb.CapabilitiesRequest(), pb.CapabilitiesResponse, deadline
        )
        self._features = frozenset(result.features)
        return result

    async def _offers(self, feature: str, deadline: float | None) -> bool:
        """Whether the runner lists ``feature`` (asked once per transport: a restarted
        daemon is the same program)."""
        if self._features is None:
            await self.capabilities(deadline or PROBE_SECONDS)
        assert self._features is not None
        return feature in self._features

    async def start(self, request: pb.StartRequest, deadline: float | None) -> pb.StartResponse:
        result: pb.StartResponse = await self._unary("Start", request, pb.StartResponse, deadline)
        return result

    async def attach(
        self, request: pb.AttachRequest, deadline: float | None
    ) -> AsyncIterator[pb.AttachResponse]:
        """Attach over the direct channel when the connector reaches one, else gRPC."""
        responses = await self._direct(request, deadline)
        if responses is None:
            responses = self._stream("Attach", request, pb.AttachResponse, deadline)
        async with closing_stream(responses):
            async for response in responses:
                yield response

    async def follow(
        self, request: pb.AttachRequest, deadline: float | None
    ) -> AsyncIterator[pb.AttachResponse]:
        """Attach over the direct channel when the connector reaches one; else on the
        channel's Session call when the runner offers sessions (one message instead of a
        new call), else with Attach."""
        if deadline is not None and deadline <= 0:
            raise errors.DeadlineExceeded(f"no answer within {deadline}s")
        responses = await self._direct(request, deadline)
        if responses is None:
            session = await self._open_session(deadline)
            responses = (
                self._stream("Attach", request, pb.AttachResponse, deadline)
                if session is None
                else session.follow(request, deadline)
            )
        async with closing_stream(responses):
            async for response in responses:
                yield response

    async def _direct(
        self, request: pb.AttachRequest, deadline: float | None
    ) -> AsyncIterator[pb.AttachResponse] | None:
        if not self.use_direct or self._direct_connector is None:
            return None
        connector = self._direct_connector
        hello = await self._offers(HELLO_FEATURE, deadline)
        dialled = self._take_spare() or await _dial_direct(connector)
        if dialled is None:
            return None
        sock, listener = dialled
        still_listening = (lambda: connector.direct_listener() == listener) if hello else None
        return self._direct_attach(sock, request, deadline, still_listening)

    async def _direct_attach(
        self,
        sock: socket.socket,
        request: pb.AttachRequest,
        deadline: float | None,
        still_listening: Callable[[], bool] | None,
    ) -> AsyncIterator[pb.AttachResponse]:
        cut = False
        try:
            responses = direct_attach(sock, request, deadline, still_listening)
            async with closing_stream(responses):
                async for response in responses:
                    yield response
        except errors.Unavailable:
            cut = True  # no spare now: a daemon that just died may leave a dead listener
            raise
        finally:
            if not cut:
                self._schedule_spare()

    def _take_spare(self) -> tuple[socket.socket, ListenerId | None] | None:
        """The connection made after the last attach, if it is young enough that the
        daemon still waits for its request (it drops a silent one after REQUEST_SECONDS)."""
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        sock, made, listener = spare
        if asyncio.get_running_loop().time() - made < REQUEST_SECONDS / 2:
            return sock, listener
        sock.close()
        return None

    def _schedule_spare(self) -> None:
        """Connect the next attach's socket once the caller has what it waited for (a
        task, so the connection, and the daemon's accept, are off the caller's path)."""
        if self._spare is None and self._spare_task is None and not self._closed:
            self._spare_task = asyncio.create_task(self._connect_spare())
            self._spare_task.add_done_callback(self._spare_done)

    def _spare_done(self, _task: asyncio.Task[None]) -> None:
        self._spare_task = None

    async def _connect_spare(self) -> None:
        """Connect the next attach's socket now, while nothing waits for it: the daemon
        accepts it off the critical path, so an exec costs it one wake-up, not two."""
        if self._spare is not None or self._direct_connector is None or self._closed:
            return
        redials = self._redials
        with contextlib.suppress(OSError, errors.RunnerError):
            dialled = await _dial_direct(self._direct_connector)
            if dialled is not None:
                sock, listener = dialled
                # Another attach ended first, or the connection was given up meanwhile.
                if self._spare is not None or self._closed or self._redials != redials:
                    sock.close()
                else:
                    self._spare = (sock, asyncio.get_running_loop().time(), listener)

    def _drop_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            spare[0].close()

    async def _open_session(self, deadline: float | None) -> _SessionCall | None:
        if not await self._offers("session", deadline):
            return None
        channel = await self._open()
        if self._session is None or self._session.failure is not None:
            self._session = _SessionCall(channel)
        return self._session

    async def write_stdin(self, request: pb.WriteStdinRequest, deadline: float | None) -> None:
        await self._unary("WriteStdin", request, pb.WriteStdinResponse, deadline)

    async def resize_pty(self, request: pb.ResizePtyRequest, deadline: float | None) -> None:
        await self._unary("ResizePty", request, pb.ResizePtyResponse, deadline)

    async def cancel(self, request: pb.CancelRequest, deadline: float | None) -> pb.CancelResponse:
        result: pb.CancelResponse = await self._unary(
            "Cancel", request, pb.CancelResponse, deadline
        )
        return result

    async def status(self, request: pb.StatusRequest, deadline: float | None) -> pb.RunStatus:
        result: pb.RunStatus = await self._unary("Status", request, pb.RunStatus, deadline)
        return result

    async def list(self, deadline: float | None) -> pb.ListResponse:
        result: pb.ListResponse = await self._unary(
            "List", pb.ListRequest(), pb.ListResponse, deadline
        )
        return result

    async def close_run(self, request: pb.CloseRequest, deadline: float | None) -> None:
        await self._unary("Close", request, pb.CloseResponse, deadline)

    def read_file(
        self, request: pb.ReadFileRequest, deadline: float | None
    ) -> AsyncIterator[pb.ReadFileResponse]:
        return self._stream("ReadFile", request, pb.ReadFileResponse, deadline)

    async def write_file(
        self, requests: AsyncIterator[pb.WriteFileRequest], deadline: float | None
    ) -> pb.WriteFileResponse:
        channel = await self._open()
        call = channel.stream_unary(
            SERVICE + "WriteFile", _serialize, pb.WriteFileResponse.FromString
        )
        try:
            result: pb.WriteFileResponse = await call(requests, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            raise map_error(exc) from None
        return result

    async def stat(self, request: pb.StatRequest, deadline: float | None) -> pb.FileInfo:
        result: pb.FileInfo = await self._unary("Stat", request, pb.FileInfo, deadline)
        return result

    async def list_dir(
        self, request: pb.ListDirRequest, deadline: float | None
    ) -> pb.ListDirResponse:
        result: pb.ListDirResponse = await self._unary(
            "ListDir", request, pb.ListDirResponse, deadline
        )
        return result

    async def reconnect(self) -> None:
        self._redials += 1
        self._drop_spare()
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        channel, self._channel = self._channel, None
        if channel is not None:
            # Closed in the background: the redial need not wait for the old channel.
            task = asyncio.create_task(_close_quietly(channel))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        self._closed = True
        if self._spare_task is not None:
            self._spare_task.cancel()
            await asyncio.gather(self._spare_task, return_exceptions=True)
        await self.reconnect()
        await asyncio.gather(*self._closing)
        await self.connector.close()


async def _dial_direct(
    connector: DirectConnector,
) -> tuple[socket.socket, ListenerId | None] | None:
    """A connection to the direct channel and the socket file it was dialled through (read
    just before: if the file changes in between, the check after a late hello only makes
    the client redial once more)."""
    listener = connector.direct_listener()
    sock = await connector.connect_direct()
    return None if sock is None else (sock, listener)
