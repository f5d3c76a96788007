"""``RunnerTransport`` over a real gRPC channel, dialled through a ``Connector``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner import errors
from forgehand.runner.client.connectors import Connector

SERVICE = "/forgehand.runner.v1.Runner/"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
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


class GrpcTransport:
    """One gRPC channel to a runner; redialled on ``reconnect``."""

    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self._channel: grpc.aio.Channel | None = None
        self._lock = asyncio.Lock()

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
        return result

    async def start(self, request: pb.StartRequest, deadline: float | None) -> pb.StartResponse:
        result: pb.StartResponse = await self._unary("Start", request, pb.StartResponse, deadline)
        return result

    def attach(
        self, request: pb.AttachRequest, deadline: float | None
    ) -> AsyncIterator[pb.AttachResponse]:
        return self._stream("Attach", request, pb.AttachResponse, deadline)

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
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close(grace=None)

    async def close(self) -> None:
        await self.reconnect()
        await self.connector.close()
