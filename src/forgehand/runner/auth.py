"""Authentication for the runner's network listeners: TLS plus a bearer token.

A unix socket is protected by its file mode (0600); every other listener must use TLS and
check ``authorization: Bearer <token>`` on every call. The token is compared in constant
time and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from forgehand.runner import errors

MIN_TOKEN_CHARS = 16
UNAUTHENTICATED_MESSAGE = "missing or wrong bearer token: pass the runner's token"


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc,type-arg]
    """Rejects every call without the expected bearer token, except on the unix socket.

    One interceptor serves every listener of a gRPC server, so the listener is told apart
    per call, by the peer address: ``unix:`` for the socket, ``ipv4:``/``ipv6:`` for TCP.
    """

    def __init__(self, token: str) -> None:
        if len(token) < MIN_TOKEN_CHARS or not _printable_ascii(token):
            raise errors.InvalidArgument(
                f"a runner token must be at least {MIN_TOKEN_CHARS} printable ASCII characters "
                "without spaces (gRPC metadata carries nothing else): generate a longer one"
            )
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if handler is None or hmac.compare_digest(given, self._expected):
            return handler
        return _unless_unix(handler)


def _printable_ascii(token: str) -> bool:
    return all("!" <= char <= "~" for char in token)


def _from_unix_socket(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    return str(context.peer()).startswith("unix:")


def _unless_unix(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """The handler for callers on the unix socket (its file mode let them in); for anyone
    else a handler that fails with UNAUTHENTICATED."""

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if not _from_unix_socket(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        call: Any = handler.stream_unary if handler.request_streaming else handler.unary_unary
        return await call(request, context)

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if not _from_unix_socket(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        call: Any = handler.stream_stream if handler.request_streaming else handler.unary_stream
        async for response in call(request, context):
            yield response

    req, resp = handler.request_streaming, handler.response_streaming
    deserialize, serialize = handler.request_deserializer, handler.response_serializer
    if req and resp:
        return grpc.stream_stream_rpc_method_handler(streaming, deserialize, serialize)
    if req:
        return grpc.stream_unary_rpc_method_handler(unary, deserialize, serialize)
    if resp:
        return grpc.unary_stream_rpc_method_handler(streaming, deserialize, serialize)
    return grpc.unary_unary_rpc_method_handler(unary, deserialize, serialize)


def server_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])


def channel_credentials(ca_cert: bytes | None, token: str) -> grpc.ChannelCredentials:
    """TLS to the runner, trusting ca_cert (or the system roots), with the bearer token."""
    return grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=ca_cert),
        grpc.access_token_call_credentials(token),
    )
