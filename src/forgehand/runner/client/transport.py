"""The seam under ``RunnerClient``: one method per RPC, in the protocol's own messages.

Two implementations: ``GrpcTransport`` (a real gRPC channel, dialled by a connector) and
``LocalTransport`` (calls into an in-process ``RunnerCore``). Both raise only
``forgehand.runner.errors`` exceptions; ``Unavailable`` means the connection was lost and
``reconnect`` may help.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Protocol, TypeVar

from forgehand._proto.runner.v1 import runner_pb2 as pb

T = TypeVar("T")


@contextlib.asynccontextmanager
async def closing_stream(stream: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close a stream (an async generator) as soon as its reader is done with it, rather
    than leaving it to the event loop's finalizer (a task per stream, later)."""
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


class RunnerTransport(Protocol):
    async def capabilities(self, deadline: float | None) -> pb.CapabilitiesResponse: ...

    async def start(self, request: pb.StartRequest, deadline: float | None) -> pb.StartResponse: ...

    def attach(
        self, request: pb.AttachRequest, deadline: float | None
    ) -> AsyncIterator[pb.AttachResponse]: ...

    def follow(
        self, request: pb.AttachRequest, deadline: float | None
    ) -> AsyncIterator[pb.AttachResponse]:
        """Attach as cheaply as the transport can (over gRPC: on a shared Session call).
        The caller must read promptly: responses may queue up in the client's memory."""

    async def write_stdin(self, request: pb.WriteStdinRequest, deadline: float | None) -> None: ...

    async def resize_pty(self, request: pb.ResizePtyRequest, deadline: float | None) -> None: ...

    async def cancel(
        self, request: pb.CancelRequest, deadline: float | None
    ) -> pb.CancelResponse: ...

    async def status(self, request: pb.StatusRequest, deadline: float | None) -> pb.RunStatus: ...

    async def list(self, deadline: float | None) -> pb.ListResponse: ...

    async def close_run(self, request: pb.CloseRequest, deadline: float | None) -> None: ...

    def read_file(
        self, request: pb.ReadFileRequest, deadline: float | None
    ) -> AsyncIterator[pb.ReadFileResponse]: ...

    async def write_file(
        self, requests: AsyncIterator[pb.WriteFileRequest], deadline: float | None
    ) -> pb.WriteFileResponse: ...

    async def stat(self, request: pb.StatRequest, deadline: float | None) -> pb.FileInfo: ...

    async def list_dir(
        self, request: pb.ListDirRequest, deadline: float | None
    ) -> pb.ListDirResponse: ...

    async def reconnect(self) -> None:
        """Drop the current connection; the next call dials again."""

    async def close(self) -> None: ...
