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
    """Rejects every call whose authorization metadata is not the expected bearer token."""

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
        return _denying(handler)


def _printable_ascii(token: str) -> bool:
    return all("!" <= char <= "~" for char in token)


def _denying(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    async def deny(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def deny_stream(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        yield  # pragma: no cover - makes this an async generator

    req, resp = handler.request_streaming, handler.response_streaming
    deserialize, serialize = handler.request_deserializer, handler.response_serializer
    if req and resp:
        return grpc.stream_stream_rpc_method_handler(deny_stream, deserialize, serialize)
    if req:
        return grpc.stream_unary_rpc_method_handler(deny, deserialize, serialize)
    if resp:
        return grpc.unary_stream_rpc_method_handler(deny_stream, deserialize, serialize)
    return grpc.unary_unary_rpc_method_handler(deny, deserialize, serialize)


def server_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])


def channel_credentials(ca_cert: bytes | None, token: str) -> grpc.ChannelCredentials:
    """TLS to the runner, trusting ca_cert (or the system roots), with the bearer token."""
    return grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=ca_cert),
        grpc.access_token_call_credentials(token),
    )
