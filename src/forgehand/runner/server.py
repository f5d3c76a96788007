"""The runner's gRPC server: a thin servicer over ``RunnerCore`` and ``FileService``.

Errors leave as status codes with a plain message: a ``RunnerError`` keeps its code and
message, anything else is logged here and sent as INTERNAL without details, so no Python
traceback or class name crosses the wire.

Attach responses are assembled by hand from the journal's serialized events
(``forgehand.runner.wire``). A daemon on a unix socket also serves the direct attach
channel beside it (``forgehand.runner.direct``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner import errors
from forgehand.runner.auth import TokenInterceptor, server_credentials
from forgehand.runner.config import DIRECT_SUFFIX, RunnerConfig, direct_socket_path
from forgehand.runner.core import AttachBatch, RunnerCore
from forgehand.runner.direct_server import DirectListener
from forgehand.runner.files import FileService
from forgehand.runner.wire import encode_attach, encode_session, encode_session_error

log = logging.getLogger(__name__)

SERVICE = "forgehand.runner.v1.Runner"
GRACE_SECONDS = 5.0
INTERNAL_MESSAGE = "internal runner error; see its log"
SESSION_QUEUE = 16  # responses a session buffers before its attaches wait for the client
T = TypeVar("T")


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], exc: Exception, method: str
) -> NoReturn:
    """End the call with the error's status; anything not ours is INTERNAL, logged here."""
    if isinstance(exc, errors.RunnerError):
        await context.abort(exc.code, str(exc))
    log.error("internal error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    raise AssertionError("unreachable")  # abort raises


def _status_errors(
    method: Callable[..., Awaitable[T]],
) -> Callable[..., Awaitable[T]]:
    @functools.wraps(method)
    async def wrapper(
        self: RunnerServicer, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> T:
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc, method.__name__)

    return wrapper


def _stream_errors(
    method: Callable[..., AsyncIterator[T]],
) -> Callable[..., AsyncIterator[T]]:
    @functools.wraps(method)
    async def wrapper(
        self: RunnerServicer, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[T]:
        try:
            async for item in method(self, request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc, method.__name__)

    return wrapper


class _Session:
    """One Session call: the attaches it opened, each a task, and their responses queued for
    the call in the order they were produced."""

    def __init__(self, core: RunnerCore) -> None:
        self.core = core
        self._out: asyncio.Queue[bytes | Exception | None] = asyncio.Queue(SESSION_QUEUE)
        self._tasks: dict[int, asyncio.Task[None]] = {}

    async def responses(self, requests: AsyncIterator[pb.SessionRequest]) -> AsyncIterator[bytes]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while (item := await self._out.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            tasks = [reader, *self._tasks.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[pb.SessionRequest]) -> None:
        try:
            async for request in requests:
                self._on_request(request)
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            await self._out.put(None)
        except Exception as exc:  # a malformed request ends the session with its status
            await self._out.put(exc)

    def _on_request(self, request: pb.SessionRequest) -> None:
        if request.cancel:
            task = self._tasks.get(request.tag)
            if task is not None:
                task.cancel()
            return
        if not request.HasField("attach"):
            raise errors.InvalidArgument("a SessionRequest opens an attach or cancels one")
        if request.tag in self._tasks:
            raise errors.InvalidArgument(f"session tag {request.tag} is in use: choose another")
        self._tasks[request.tag] = asyncio.create_task(self._attach(request.tag, request.attach))

    async def _attach(self, tag: int, request: pb.AttachRequest) -> None:
        try:
            if request.HasField("start"):
                await self.core.start_for_attach(request)
            batches = self.core.attach(
                request.run_id, request.after_seq, request.wait_seconds, request.max_batch_bytes
            )
            final = AttachBatch([])
            async with contextlib.aclosing(batches):  # closed at once when cancelled
                async for batch in batches:
                    final = batch
                    await self._out.put(encode_session(tag, batch))
            if not final.final:
                await self._out.put(encode_session(tag, AttachBatch([], final=True)))
        except errors.RunnerError as exc:
            await self._out.put(encode_session_error(tag, exc))
        except Exception as exc:
            log.error("internal error in Session", exc_info=exc)
            await self._out.put(encode_session_error(tag, errors.Internal(INTERNAL_MESSAGE)))
        finally:
            self._tasks.pop(tag, None)


class RunnerServicer:
    """Implements forgehand.runner.v1.Runner over a RunnerCore."""

    def __init__(self, core: RunnerCore, files: FileService) -> None:
        self.core = core
        self.files = files

    @_status_errors
    async def Capabilities(self, request: pb.CapabilitiesRequest, _ctx: Any) -> Any:
        return self.core.capabilities()

    @_status_errors
    async def Start(self, request: pb.StartRequest, _ctx: Any) -> Any:
        run_id, created = await self.core.start(request)
        return pb.StartResponse(run_id=run_id, created=created)

    @_stream_errors
    async def Attach(self, request: pb.AttachRequest, _ctx: Any) -> AsyncIterator[bytes]:
        if request.HasField("start"):
            await self.core.start_for_attach(request)
        batches = self.core.attach(
            request.run_id, request.after_seq, request.wait_seconds, request.max_batch_bytes
        )
        async for batch in batches:
            yield encode_attach(batch)

    @_stream_errors
    async def Session(
        self, requests: AsyncIterator[pb.SessionRequest], _ctx: Any
    ) -> AsyncIterator[bytes]:
        async for response in _Session(self.core).responses(requests):
            yield response

    @_status_errors
    async def WriteStdin(self, request: pb.WriteStdinRequest, _ctx: Any) -> Any:
        await self.core.write_stdin(request.run_id, request.data, request.eof)
        return pb.WriteStdinResponse()

    @_status_errors
    async def ResizePty(self, request: pb.ResizePtyRequest, _ctx: Any) -> Any:
        await self.core.resize_pty(request.run_id, request.size.rows, request.size.cols)
        return pb.ResizePtyResponse()

    @_status_errors
    async def Cancel(self, request: pb.CancelRequest, _ctx: Any) -> Any:
        was_running = await self.core.cancel(request.run_id, request.grace_seconds)
        return pb.CancelResponse(was_running=was_running)

    @_status_errors
    async def Status(self, request: pb.StatusRequest, _ctx: Any) -> Any:
        return self.core.status(request.run_id)

    @_status_errors
    async def List(self, request: pb.ListRequest, _ctx: Any) -> Any:
        return pb.ListResponse(runs=self.core.list())

    @_status_errors
    async def Close(self, request: pb.CloseRequest, _ctx: Any) -> Any:
        await self.core.close(request.run_id, request.force)
        return pb.CloseResponse()

    @_stream_errors
    async def ReadFile(self, request: pb.ReadFileRequest, _ctx: Any) -> AsyncIterator[Any]:
        async for chunk in self.files.read(request):
            yield chunk

    @_status_errors
    async def WriteFile(self, requests: AsyncIterator[pb.WriteFileRequest], _ctx: Any) -> Any:
        return await self.files.write(requests)

    @_status_errors
    async def Stat(self, request: pb.StatRequest, _ctx: Any) -> Any:
        return await self.files.stat(request.path)

    @_status_errors
    async def ListDir(self, request: pb.ListDirRequest, _ctx: Any) -> Any:
        return await self.files.list_dir(request.path, request.max_entries)


# Requests over the configured limit are refused by us (INVALID_ARGUMENT); grpcio's own
# cap, HARD_CAP_FACTOR times larger, only protects memory.
HARD_CAP_FACTOR = 4


def _decode(message_type: Any, raw: bytes, limit: int) -> Any:
    """Parse a request here rather than in grpcio, so malformed or oversized bytes are
    INVALID_ARGUMENT with a plain message instead of UNKNOWN with a Python class path."""
    if len(raw) > limit:
        raise errors.InvalidArgument(
            f"{message_type.DESCRIPTOR.name} of {len(raw)} bytes is over the runner's limit "
            f"of {limit}: send smaller pieces (WriteFile and WriteStdin stream)"
        )
    try:
        return message_type.FromString(raw)
    except DecodeError:
        raise errors.InvalidArgument(
            f"malformed {message_type.DESCRIPTOR.name} message: not valid protobuf"
        ) from None


def _unary(method: Any, message_type: Any, limit: int) -> grpc.RpcMethodHandler[Any, Any]:
    async def handler(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            request = _decode(message_type, raw, limit)
        except errors.RunnerError as exc:
            await context.abort(exc.code, str(exc))
        return await method(request, context)

    return grpc.unary_unary_rpc_method_handler(handler, None, _serialize)


def _server_stream(
    method: Any, message_type: Any, limit: int, raw_out: bool = False
) -> grpc.RpcMethodHandler[Any, Any]:
    async def handler(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            request = _decode(message_type, raw, limit)
        except errors.RunnerError as exc:
            await context.abort(exc.code, str(exc))
        async for item in method(request, context):
            yield item

    return grpc.unary_stream_rpc_method_handler(
        handler, None, (lambda b: b) if raw_out else _serialize
    )


def _bidi_stream(method: Any, message_type: Any, limit: int) -> grpc.RpcMethodHandler[Any, Any]:
    async def handler(
        raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async def decoded() -> AsyncIterator[Any]:
            async for raw in raws:
                yield _decode(message_type, raw, limit)

        async for item in method(decoded(), context):
            yield item

    return grpc.stream_stream_rpc_method_handler(handler, None, lambda b: b)


def _client_stream(method: Any, message_type: Any, limit: int) -> grpc.RpcMethodHandler[Any, Any]:
    async def handler(
        raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        async def decoded() -> AsyncIterator[Any]:
            async for raw in raws:
                yield _decode(message_type, raw, limit)

        return await method(decoded(), context)

    return grpc.stream_unary_rpc_method_handler(handler, None, _serialize)


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _handlers(servicer: RunnerServicer, limit: int) -> grpc.GenericRpcHandler[Any, Any]:
    s, n = servicer, limit
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Capabilities": _unary(s.Capabilities, pb.CapabilitiesRequest, n),
            "Start": _unary(s.Start, pb.StartRequest, n),
            "Attach": _server_stream(s.Attach, pb.AttachRequest, n, raw_out=True),
            "Session": _bidi_stream(s.Session, pb.SessionRequest, n),
            "WriteStdin": _unary(s.WriteStdin, pb.WriteStdinRequest, n),
            "ResizePty": _unary(s.ResizePty, pb.ResizePtyRequest, n),
            "Cancel": _unary(s.Cancel, pb.CancelRequest, n),
            "Status": _unary(s.Status, pb.StatusRequest, n),
            "List": _unary(s.List, pb.ListRequest, n),
            "Close": _unary(s.Close, pb.CloseRequest, n),
            "ReadFile": _server_stream(s.ReadFile, pb.ReadFileRequest, n),
            "WriteFile": _client_stream(s.WriteFile, pb.WriteFileRequest, n),
            "Stat": _unary(s.Stat, pb.StatRequest, n),
            "ListDir": _unary(s.ListDir, pb.ListDirRequest, n),
        },
    )


def channel_options(config_max_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", config_max_bytes),
        ("grpc.max_receive_message_length", config_max_bytes * HARD_CAP_FACTOR),
        # Start streams with a large flow-control window: output batches are up to a few
        # MiB, and the default 64 KiB window costs round trips before the first one lands.
        ("grpc.http2.lookahead_bytes", 16 * 1024 * 1024),
        ("grpc.so_reuseport", 0),
    ]


class RunnerServer:
    """A running daemon: core + gRPC server on one or more listeners.

    ``async with RunnerServer(config, unix_socket=path) as server`` serves until the block
    ends, then stops with a grace period of ``GRACE_SECONDS`` for RPCs in flight. Runs keep
    going: their supervisors do not depend on the daemon.
    """

    def __init__(
        self,
        config: RunnerConfig,
        *,
        unix_socket: Path | None = None,
        tcp: str | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        token: str | None = None,
    ) -> None:
        if tcp and not (tls_cert and tls_key and token):
            raise errors.InvalidArgument(
                "a TCP listener needs TLS and a bearer token: pass --tls-cert, --tls-key "
                "and --token-file"
            )
        if not unix_socket and not tcp:
            raise errors.InvalidArgument("give a unix socket path or a TCP address to listen on")
        self.config = config
        self.unix_socket = unix_socket
        self.tcp = tcp
        self.tls_cert, self.tls_key, self.token = tls_cert, tls_key, token
        # Built here so a weak or unsendable token is refused before anything starts.
        self._interceptor = TokenInterceptor(token) if token else None
        self.core = RunnerCore(config)
        self.tcp_port = 0
        self._server: grpc.aio.Server | None = None
        self._direct: DirectListener | None = None

    async def __aenter__(self) -> RunnerServer:
        await self.core.__aenter__()
        try:
            await self._start_grpc()
            await self._start_direct()
        except BaseException:
            await self._stop()
            await self.core.__aexit__(None, None, None)
            raise
        return self

    async def _start_direct(self) -> None:
        """The direct attach channel beside the unix socket (not beside TCP: it has no
        TLS or token, and a remote client gains nothing from it)."""
        if self.unix_socket is None:
            return
        path = direct_socket_path(self.unix_socket)
        if path is None:
            log.warning(
                "no direct attach channel: %s%s is too long a socket path",
                self.unix_socket,
                DIRECT_SUFFIX,
            )
            return
        listener = DirectListener(self.core, path, self.config.max_message_bytes)
        await listener.start()
        self._direct = listener

    async def _start_grpc(self) -> None:
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (
            [self._interceptor] if self._interceptor else []
        )
        server = grpc.aio.server(
            options=channel_options(self.config.max_message_bytes), interceptors=interceptors
        )
        files = FileService(self.config.file_roots())
        servicer = RunnerServicer(self.core, files)
        server.add_generic_rpc_handlers((_handlers(servicer, self.config.max_message_bytes),))
        if self.unix_socket is not None:
            self._bind_unix(server, self.unix_socket)
        if self.tcp:
            assert self.tls_cert is not None
            assert self.tls_key is not None
            creds = server_credentials(self.tls_cert, self.tls_key)
            self.tcp_port = server.add_secure_port(self.tcp, creds)
        await server.start()
        self._server = server

    @staticmethod
    def _bind_unix(server: grpc.aio.Server, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o177)  # the socket is created 0600: only our user may connect
        try:
            server.add_insecure_port(f"unix:{path}")
        finally:
            os.umask(old)

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def _stop(self) -> None:
        if self._direct is not None:
            await self._direct.close()
            self._direct = None
        if self._server is not None:
            await self._server.stop(GRACE_SECONDS)
            self._server = None

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()
        await self.core.__aexit__(*exc_info)
        if self.unix_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                self.unix_socket.unlink()
