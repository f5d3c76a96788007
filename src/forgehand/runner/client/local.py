"""``RunnerTransport`` straight into an in-process ``RunnerCore``: no sockets, same contract.

Used where the caller and the runner share a process (tests, `forgehand` driving local
work without a sandbox) and as a second implementation that must pass the same suite as
the gRPC one. Deadlines behave as over gRPC: a call that outlives its timeout fails with
``DeadlineExceeded``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner import errors
from forgehand.runner.core import RunnerCore
from forgehand.runner.files import FileService
from forgehand.runner.journal import parse_event

T = TypeVar("T")


async def _deadline(awaitable: Awaitable[T], deadline: float | None) -> T:
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        result = await asyncio.wait_for(awaitable, deadline)
    except TimeoutError:
        raise errors.DeadlineExceeded(f"no answer within {deadline}s") from None
    if deadline is not None and loop.time() - started > deadline:
        # As over gRPC: an answer that comes after the deadline is not an answer.
        raise errors.DeadlineExceeded(f"no answer within {deadline}s")
    return result


def _sync(call: Callable[[], T], deadline: float | None) -> T:
    """A call that answers at once: only an already expired deadline can fail it."""
    if deadline is not None and deadline <= 0:
        raise errors.DeadlineExceeded(f"no answer within {deadline}s")
    return call()


async def _deadline_stream(source: AsyncIterator[T], deadline: float | None) -> AsyncIterator[T]:
    loop = asyncio.get_running_loop()
    end = None if deadline is None else loop.time() + deadline
    iterator = aiter(source)
    while True:
        remaining = None if end is None else max(0.0, end - loop.time())
        try:
            item = await asyncio.wait_for(anext(iterator), remaining)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise errors.DeadlineExceeded(f"no answer within {deadline}s") from None
        yield item


class LocalTransport:
    def __init__(self, core: RunnerCore, files: FileService | None = None) -> None:
        self.core = core
        self.files = files or FileService(core.config.file_roots())

    async def capabilities(self, deadline: float | None) -> pb.CapabilitiesResponse:
        return _sync(self.core.capabilities, deadline)

    async def start(self, request: pb.StartRequest, deadline: float | None) -> pb.StartResponse:
        copy = pb.StartRequest()
        copy.CopyFrom(request)
        run_id, created = await _deadline(self.core.start(copy), deadline)
        return pb.StartResponse(run_id=run_id, created=created)

    async def attach(
        self, request: pb.AttachRequest, deadline: float | None
    ) -> AsyncIterator[pb.AttachResponse]:
        if request.HasField("start"):
            await _deadline(self.core.start_for_attach(request), deadline)
        batches = self.core.attach(
            request.run_id, request.after_seq, request.wait_seconds, request.max_batch_bytes
        )
        async for batch in _deadline_stream(batches, deadline):
            response = pb.AttachResponse(handback=batch.handback, ended=batch.ended)
            for payload in batch.events:
                response.events.add().CopyFrom(parse_event(payload))
            yield response

    def follow(
        self, request: pb.AttachRequest, deadline: float | None
    ) -> AsyncIterator[pb.AttachResponse]:
        return self.attach(request, deadline)

    async def write_stdin(self, request: pb.WriteStdinRequest, deadline: float | None) -> None:
        await _deadline(self.core.write_stdin(request.run_id, request.data, request.eof), deadline)

    async def resize_pty(self, request: pb.ResizePtyRequest, deadline: float | None) -> None:
        size = request.size
        await _deadline(self.core.resize_pty(request.run_id, size.rows, size.cols), deadline)

    async def cancel(self, request: pb.CancelRequest, deadline: float | None) -> pb.CancelResponse:
        was_running = await _deadline(
            self.core.cancel(request.run_id, request.grace_seconds), deadline
        )
        return pb.CancelResponse(was_running=was_running)

    async def status(self, request: pb.StatusRequest, deadline: float | None) -> pb.RunStatus:
        return _sync(lambda: self.core.status(request.run_id), deadline)

    async def list(self, deadline: float | None) -> pb.ListResponse:
        return _sync(lambda: pb.ListResponse(runs=self.core.list()), deadline)

    async def close_run(self, request: pb.CloseRequest, deadline: float | None) -> None:
        await _deadline(self.core.close(request.run_id, request.force), deadline)

    async def read_file(
        self, request: pb.ReadFileRequest, deadline: float | None
    ) -> AsyncIterator[pb.ReadFileResponse]:
        async for chunk in _deadline_stream(self.files.read(request), deadline):
            yield chunk

    async def write_file(
        self, requests: AsyncIterator[pb.WriteFileRequest], deadline: float | None
    ) -> pb.WriteFileResponse:
        return await _deadline(self.files.write(requests), deadline)

    async def stat(self, request: pb.StatRequest, deadline: float | None) -> pb.FileInfo:
        return await _deadline(self.files.stat(request.path), deadline)

    async def list_dir(
        self, request: pb.ListDirRequest, deadline: float | None
    ) -> pb.ListDirResponse:
        return await _deadline(self.files.list_dir(request.path, request.max_entries), deadline)

    async def reconnect(self) -> None:
        return None

    async def close(self) -> None:
        return None
