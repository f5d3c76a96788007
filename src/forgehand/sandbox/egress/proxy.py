"""The host-side egress proxy: one per sandbox, listening on a unix socket.

A client (the in-sandbox forwarder) sends one request per connection: CONNECT host:port
for TLS, or an absolute-form `http://` request. The proxy checks read-only mode and the
allowlist by name, resolves the name itself, refuses if any address is not public, then
connects to an address it checked (never resolving twice) and relays. Every decision is
logged. Stopping closes the listener, gives open connections `shutdown_grace_seconds`,
then closes the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import os
import socket
import stat
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Self

from forgehand.sandbox.egress import policy
from forgehand.sandbox.egress.addresses import IPAddress
from forgehand.sandbox.egress.config import EgressConfig, is_ip_literal
from forgehand.sandbox.egress.decisions import Decision, DecisionLog
from forgehand.sandbox.egress.errors import (
    BadRequestError,
    EgressStartError,
    EgressStateError,
    RequestRefused,
    ResolveError,
    Verdict,
)
from forgehand.sandbox.egress.httpwire import (
    RequestHead,
    Target,
    parse_absolute_target,
    parse_connect_target,
    parse_request_head,
    text_response,
)
from forgehand.sandbox.egress.plainhttp import forward_http
from forgehand.sandbox.egress.relay import Stream, request_framing, tunnel
from forgehand.sandbox.egress.resolver import Resolver, SystemResolver

log = logging.getLogger(__name__)


class ProxyState(enum.Enum):
    """Lifecycle of an EgressProxy."""

    CREATED = "created"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


def _bind_unix_socket(path: Path) -> socket.socket:
    if path.exists() or path.is_symlink():
        raise EgressStartError(f"{path} already exists: remove the stale socket or pick a new path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # chmod before listen(): nobody can connect while the mode is still the umask's.
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    except OSError as exc:
        sock.close()
        raise EgressStartError(
            f"cannot listen on {path}: {exc}; choose a shorter, writable path"
        ) from exc
    return sock


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _refusal_body(head: RequestHead | None, target: Target | None, exc: RequestRefused) -> str:
    what = f"{head.method} {target.host}:{target.port}" if head and target else "the request"
    return f"forgehand egress proxy refused {what}: {exc.reason}.\n{exc.remedy}\n"


def _target_of(head: RequestHead) -> Target:
    try:
        if head.method == "CONNECT":
            return parse_connect_target(head.target)
        target = parse_absolute_target(head.target)
        request_framing(head.headers)
    except BadRequestError as exc:
        raise _bad_request(str(exc)) from exc
    return target


def _bad_request(reason: str) -> RequestRefused:
    return RequestRefused(
        HTTPStatus.BAD_REQUEST, "rejected", reason, "Fix the request; see RFC 9112 for the syntax."
    )


def _too_many(limit: int) -> RequestRefused:
    remedy = f"At most {limit} connections are served at once; retry later."
    return RequestRefused(
        HTTPStatus.SERVICE_UNAVAILABLE, "rejected", "too many open connections", remedy
    )


def _failed(reason: str, rule: str) -> RequestRefused:
    remedy = "The host is allowed but unreachable; check the name and port, then retry."
    return RequestRefused(HTTPStatus.BAD_GATEWAY, "failed", reason, remedy, rule=rule)


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class EgressProxy:
    """An allowlisting HTTP/CONNECT proxy on a unix socket. Use as `async with`."""

    def __init__(self, config: EgressConfig, *, resolver: Resolver | None = None) -> None:
        self.config = config
        self.state = ProxyState.CREATED
        self._resolver: Resolver = resolver or SystemResolver()
        self._log = DecisionLog(config.decision_log_path, keep=config.decisions_kept_in_memory)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    @property
    def socket_path(self) -> Path:
        """The unix socket clients connect to."""
        return self.config.socket_path

    @property
    def decision_log_path(self) -> Path:
        """The JSON-lines file every decision is appended to."""
        return self.config.decision_log_path

    @property
    def decisions(self) -> tuple[Decision, ...]:
        """The most recent decisions, oldest first."""
        return self._log.recent

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the decision log and start listening."""
        if self.state is not ProxyState.CREATED:
            raise EgressStateError(
                f"proxy is {self.state.value}: create a new EgressProxy to start again"
            )
        # No thread and no await until the server holds the socket: a start cancelled
        # meanwhile would lose the descriptor a thread returned. Both are local syscalls.
        self._log.open()
        try:
            sock = _bind_unix_socket(self.socket_path)
        except EgressStartError:
            await self._log.close()
            raise
        try:
            self._server = await asyncio.start_unix_server(
                self._on_client, sock=sock, limit=self.config.max_header_bytes, start_serving=False
            )
        except BaseException:
            sock.close()
            _unlink(self.socket_path)
            await self._log.close()
            raise
        self.state = ProxyState.RUNNING  # from here, stop() undoes it all
        await self._server.start_serving()

    async def stop(self) -> None:
        """Stop listening, give open connections the grace period, close the rest."""
        if self.state is not ProxyState.RUNNING or self._server is None:
            return
        self.state = ProxyState.STOPPING
        self._server.close()
        await self._drain_connections()
        await self._server.wait_closed()
        await asyncio.to_thread(_unlink, self.socket_path)
        await self._log.close()
        self.state = ProxyState.STOPPED

    async def _drain_connections(self) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(
            set(self._tasks), timeout=self.config.shutdown_grace_seconds
        )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        over_limit = len(self._tasks) >= self.config.max_connections
        self._tasks.add(task)
        try:
            await self._serve(Stream(reader, writer), over_limit=over_limit)
        except Exception:
            log.exception("egress proxy: unexpected error while serving a client")
        finally:
            self._tasks.discard(task)
            await _close(writer)

    async def _serve(self, client: Stream, *, over_limit: bool) -> None:
        head: RequestHead | None = None
        target: Target | None = None
        try:
            if over_limit:
                raise _too_many(self.config.max_connections)
            head = await self._read_head(client.reader)
            target = _target_of(head)
            upstream = await self._decide_and_connect(head, target)
        except RequestRefused as exc:
            await self._record(head, target, exc.verdict, exc.reason, exc.rule, exc.address)
            with contextlib.suppress(ConnectionError):
                await _send(
                    client.writer, text_response(exc.status, _refusal_body(head, target, exc))
                )
            return
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            return
        try:
            await self._relay(client, upstream, head, target)
        finally:
            await _close(upstream.writer)

    async def _read_head(self, reader: asyncio.StreamReader) -> RequestHead:
        try:
            data = await asyncio.wait_for(
                reader.readuntil(b"\r\n\r\n"), self.config.header_timeout_seconds
            )
            return parse_request_head(data)
        except asyncio.LimitOverrunError as exc:
            raise _bad_request(
                f"request head is larger than {self.config.max_header_bytes} bytes"
            ) from exc
        except BadRequestError as exc:
            raise _bad_request(str(exc)) from exc

    async def _decide_and_connect(self, head: RequestHead, target: Target) -> Stream:
        policy.check_method(self.config, head.method)
        rule = policy.match_rule(self.config, target)
        addresses = await self._resolve(target, str(rule))
        policy.check_addresses(self.config, target, rule, addresses)
        upstream, address = await self._connect(target, addresses, str(rule))
        try:
            await self._record(
                head, target, "allowed", "matched the allowlist", str(rule), str(address)
            )
        except BaseException:
            upstream.writer.close()
            raise
        return upstream

    async def _resolve(self, target: Target, rule: str) -> list[IPAddress]:
        if is_ip_literal(target.host):
            return [ipaddress.ip_address(target.host)]
        try:
            return await asyncio.wait_for(
                self._resolver.resolve(target.host, target.port),
                self.config.connect_timeout_seconds,
            )
        except (ResolveError, TimeoutError) as exc:
            raise _failed(
                f"{target.host} could not be resolved ({exc or 'timeout'})", rule
            ) from exc

    async def _connect(
        self, target: Target, addresses: list[IPAddress], rule: str
    ) -> tuple[Stream, IPAddress]:
        errors: list[str] = []
        for address in addresses:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        str(address), target.port, limit=self.config.max_header_bytes
                    ),
                    self.config.connect_timeout_seconds,
                )
            except (OSError, TimeoutError) as exc:
                errors.append(f"{address}: {exc or 'timeout'}")
                continue
            return Stream(reader, writer), address
        raise _failed(
            f"could not connect to {target.host}:{target.port} ({'; '.join(errors)})", rule
        )

    async def _relay(
        self, client: Stream, upstream: Stream, head: RequestHead, target: Target
    ) -> None:
        idle = self.config.idle_timeout_seconds
        with contextlib.suppress(
            ConnectionError, TimeoutError, asyncio.IncompleteReadError, BadRequestError
        ):
            if head.method == "CONNECT":
                await _send(client.writer, b"HTTP/1.1 200 Connection Established\r\n\r\n")
                await tunnel(
                    (client.reader, client.writer), (upstream.reader, upstream.writer), idle
                )
            else:
                await forward_http(client, upstream, head, target, idle)

    async def _record(
        self,
        head: RequestHead | None,
        target: Target | None,
        verdict: Verdict,
        reason: str,
        rule: str | None,
        address: str | None,
    ) -> None:
        decision = Decision(
            host=target.host if target else None,
            port=target.port if target else None,
            method=head.method if head else None,
            decision=verdict,
            rule=rule,
            reason=reason,
            address=address,
        )
        await self._log.record(decision)
