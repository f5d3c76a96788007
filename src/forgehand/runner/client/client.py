"""``RunnerClient``: the one client of a runner, over any ``RunnerTransport``.

- ``attach`` yields every event of a run exactly once, in order. When the connection is
  lost it redials with backoff and resumes after the last seq it delivered.
- Idempotent calls (start — idempotent by run id —, status, list, cancel, capabilities,
  file reads and stats) are retried the same way; writes to stdin and files are not,
  since repeating them could repeat their effect.
- ``run`` = start + attach + collect, in one call: ``collect`` follows the run on the
  channel's long-lived Session stream when the runner offers it (a message on an open
  stream costs far less than a new gRPC call), starting it there if asked to.

Lifecycle: ``async with RunnerClient(transport) as client`` (or ``await client.close()``).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TypeVar

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner import errors
from forgehand.runner.client.connectors import (
    Connector,
    ExecConnector,
    TlsConnector,
    UnixConnector,
)
from forgehand.runner.client.grpc_transport import GrpcTransport
from forgehand.runner.client.transport import RunnerTransport, closing_stream
from forgehand.runner.model import (
    Event,
    Exited,
    FileInfo,
    Handback,
    Output,
    RunInfo,
    RunResult,
    RunSpec,
    StepEvent,
    Stream,
    Truncated,
    event_from_proto,
    file_info_from_proto,
    run_info_from_proto,
)

T = TypeVar("T")
WRITE_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """Reconnect backoff: immediately, then doubling from ``first`` up to ``cap`` seconds."""

    attempts: int = 8
    first: float = 0.01
    cap: float = 2.0

    def delay(self, attempt: int) -> float:
        if attempt == 0:
            return 0.0
        base: float = min(self.cap, self.first * 2 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not crypto


class ClientState(Enum):
    OPEN = "open"
    CLOSED = "closed"


class RunnerClient:
    def __init__(
        self,
        transport: RunnerTransport,
        *,
        rpc_timeout: float | None = 30.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.transport = transport
        self.rpc_timeout = rpc_timeout
        self.retry = retry or RetryPolicy()
        self.state = ClientState.OPEN
        self.reconnects = 0
        self.resume_ms: list[float] = []
        """Per resumed attach: ms from noticing the broken stream to the next event."""

    @classmethod
    def connect(cls, connector: Connector, **kwargs: object) -> RunnerClient:
        return cls(GrpcTransport(connector), **kwargs)  # type: ignore[arg-type]

    @classmethod
    def unix(cls, path: str | Path, **kwargs: object) -> RunnerClient:
        return cls.connect(UnixConnector(path), **kwargs)

    @classmethod
    def exec(cls, argv: list[str], **kwargs: object) -> RunnerClient:
        return cls.connect(ExecConnector(argv), **kwargs)

    @classmethod
    def tls(
        cls, address: str, token: str, ca_cert: bytes | None = None, **kwargs: object
    ) -> RunnerClient:
        return cls.connect(TlsConnector(address, token, ca_cert), **kwargs)

    async def __aenter__(self) -> RunnerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.state is ClientState.OPEN:
            self.state = ClientState.CLOSED
            await self.transport.close()

    # -- retry plumbing -----------------------------------------------------------------

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await call()
            except errors.Unavailable:
                attempt = await self._backoff(attempt)

    async def _backoff(self, attempt: int) -> int:
        if attempt >= self.retry.attempts:
            raise errors.Unavailable(
                f"the runner stayed unreachable after {attempt} reconnects: check that it "
                "is running and that the connection (socket, exec channel) works"
            )
        await self.transport.reconnect()
        self.reconnects += 1
        delay = self.retry.delay(attempt)
        if delay > 0:  # the first retry goes at once
            await asyncio.sleep(delay)
        return attempt + 1

    # -- runs ---------------------------------------------------------------------------

    async def capabilities(self) -> pb.CapabilitiesResponse:
        return await self._retrying(lambda: self.transport.capabilities(self.rpc_timeout))

    async def start(self, spec: RunSpec, run_id: str | None = None) -> str:
        """Start a run and return its id (a new random one unless given)."""
        request = spec.to_proto(run_id or new_run_id())
        response = await self._retrying(lambda: self.transport.start(request, self.rpc_timeout))
        return response.run_id

    async def attach(
        self,
        run_id: str,
        after_seq: int = 0,
        wait_seconds: float = 0.0,
        start: pb.StartRequest | None = None,
    ) -> AsyncIterator[Event | Handback]:
        """Every event after ``after_seq`` exactly once; ends at Exited, or with a Handback
        after ``wait_seconds`` while the run goes on (0 = wait for the end). Attaching
        after a finished run's last event yields nothing."""
        events = self._events(run_id, after_seq, wait_seconds, start, follow=False)
        async with closing_stream(events):
            async for event in events:
                yield event

    async def _events(
        self,
        run_id: str,
        after_seq: int,
        wait_seconds: float,
        start: pb.StartRequest | None,
        follow: bool,
    ) -> AsyncIterator[Event | Handback]:
        """``attach``; with ``follow``, over the transport's cheapest way (a gRPC Session),
        for callers that read every event at once."""
        open_stream = self.transport.follow if follow else self.transport.attach
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds if wait_seconds > 0 else None
        last, attempt = after_seq, 0
        broken_at = 0.0
        while True:
            remaining = 0.0 if deadline is None else max(0.001, deadline - loop.time())
            request = pb.AttachRequest(run_id=run_id, after_seq=last, wait_seconds=remaining)
            if start is not None:
                request.start.CopyFrom(start)  # idempotent: safe to resend on reconnect
            try:
                async with closing_stream(open_stream(request, None)) as responses:
                    async for response in responses:
                        attempt = 0
                        if broken_at:
                            self.resume_ms.append((time.perf_counter() - broken_at) * 1000)
                            broken_at = 0.0
                        for proto in response.events:
                            if proto.seq <= last:
                                continue
                            last = proto.seq
                            event = event_from_proto(proto)
                            yield event
                            if isinstance(event, Exited):
                                return
                        if response.handback:
                            yield Handback(last)
                            return
                        if response.ended:
                            return
                raise errors.Unavailable("the attach stream was cut")
            except errors.Unavailable:
                broken_at = broken_at or time.perf_counter()
                attempt = await self._backoff(attempt)

    async def run(
        self, spec: RunSpec, run_id: str | None = None, stdin: bytes | None = None
    ) -> RunResult:
        """Start a run, feed it ``stdin`` if given, and collect its output until it ends."""
        if stdin is not None and not spec.stdin:
            raise errors.InvalidArgument("pass a RunSpec with stdin=True to send stdin")
        if stdin is not None:
            run_id = await self.start(spec, run_id)
            await self.write_stdin(run_id, stdin, eof=True)
            return await self.collect(run_id)
        run_id = run_id or new_run_id()
        return await self.collect(run_id, start=spec.to_proto(run_id))

    async def collect(
        self, run_id: str, after_seq: int = 0, start: pb.StartRequest | None = None
    ) -> RunResult:
        """Attach until the run ends (starting it first if ``start`` is given) and gather its
        output by stream."""
        chunks: dict[Stream, list[bytes]] = {s: [] for s in Stream}
        truncated: list[Truncated] = []
        steps: list[StepEvent] = []
        events = self._events(run_id, after_seq, 0.0, start, follow=True)
        async with closing_stream(events):
            async for event in events:
                if isinstance(event, Output):
                    chunks[event.stream].append(event.data)
                elif isinstance(event, Truncated):
                    truncated.append(event)
                elif isinstance(event, StepEvent):
                    steps.append(event)
                elif isinstance(event, Exited):
                    return RunResult(
                        run_id,
                        event,
                        stdout=b"".join(chunks[Stream.STDOUT]),
                        stderr=b"".join(chunks[Stream.STDERR]),
                        pty=b"".join(chunks[Stream.PTY]),
                        truncated=truncated,
                        steps=steps,
                    )
        raise errors.Internal(f"run {run_id!r} ended its event stream without an exit")

    async def write_stdin(self, run_id: str, data: bytes, eof: bool = False) -> None:
        request = pb.WriteStdinRequest(run_id=run_id, data=data, eof=eof)
        await self.transport.write_stdin(request, self.rpc_timeout)

    async def resize_pty(self, run_id: str, rows: int, cols: int) -> None:
        request = pb.ResizePtyRequest(run_id=run_id, size=pb.PtySize(rows=rows, cols=cols))
        await self._retrying(lambda: self.transport.resize_pty(request, self.rpc_timeout))

    async def cancel(self, run_id: str, grace_seconds: float = 0.0) -> bool:
        request = pb.CancelRequest(run_id=run_id, grace_seconds=grace_seconds)
        response = await self._retrying(lambda: self.transport.cancel(request, self.rpc_timeout))
        return response.was_running

    async def status(self, run_id: str) -> RunInfo:
        request = pb.StatusRequest(run_id=run_id)
        status = await self._retrying(lambda: self.transport.status(request, self.rpc_timeout))
        return run_info_from_proto(status)

    async def list_runs(self) -> list[RunInfo]:
        response = await self._retrying(lambda: self.transport.list(self.rpc_timeout))
        return [run_info_from_proto(s) for s in response.runs]

    async def close_run(self, run_id: str, force: bool = False) -> None:
        request = pb.CloseRequest(run_id=run_id, force=force)
        await self.transport.close_run(request, self.rpc_timeout)

    # -- files --------------------------------------------------------------------------

    async def read_file(self, path: str, offset: int = 0, length: int = 0) -> bytes:
        request = pb.ReadFileRequest(path=path, offset=offset, length=length)

        async def read() -> bytes:
            parts = [c.data async for c in self.transport.read_file(request, self.rpc_timeout)]
            return b"".join(parts)

        return await self._retrying(read)

    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes],
        mode: int = 0o644,
        create_parents: bool = False,
    ) -> FileInfo:
        header = pb.WriteFileHeader(path=path, mode=mode, create_parents=create_parents)
        response = await self.transport.write_file(_write_requests(header, data), self.rpc_timeout)
        return file_info_from_proto(response.info)

    async def stat(self, path: str) -> FileInfo:
        request = pb.StatRequest(path=path)
        info = await self._retrying(lambda: self.transport.stat(request, self.rpc_timeout))
        return file_info_from_proto(info)

    async def list_dir(self, path: str, max_entries: int = 0) -> tuple[list[FileInfo], bool]:
        """The directory's entries (sorted by name) and whether the list was cut short."""
        request = pb.ListDirRequest(path=path, max_entries=max_entries)
        response = await self._retrying(lambda: self.transport.list_dir(request, self.rpc_timeout))
        return [file_info_from_proto(e) for e in response.entries], response.truncated


async def _write_requests(
    header: pb.WriteFileHeader, data: bytes | AsyncIterable[bytes]
) -> AsyncIterator[pb.WriteFileRequest]:
    yield pb.WriteFileRequest(header=header)
    if isinstance(data, bytes):
        for offset in range(0, len(data), WRITE_CHUNK):
            yield pb.WriteFileRequest(data=data[offset : offset + WRITE_CHUNK])
    else:
        async for chunk in data:
            yield pb.WriteFileRequest(data=chunk)
    yield pb.WriteFileRequest(commit=True)


def new_run_id() -> str:
    return uuid.uuid4().hex
