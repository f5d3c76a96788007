"""How a client reaches a runner. A connector yields what a gRPC channel needs to dial.

- ``UnixConnector``: the runner's unix socket (the default; protected by its file mode),
  and the direct attach channel beside it (``forgehand.runner.direct``).
- ``TlsConnector``: TCP with TLS and a bearer token.
- ``ExecConnector``: the stdio of any command that ends in ``forgehand-runner proxy``
  (``ssh host forgehand-runner proxy …``, ``kubectl exec -i …``, ``podman exec -i …``).
  It listens on a private local unix socket and, for every connection the channel makes,
  starts the command and pumps bytes both ways, so a reconnect is a fresh exec channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import grpc

from forgehand.runner.auth import channel_credentials
from forgehand.runner.config import direct_socket_path
from forgehand.runner.pump import pump_both


@dataclass(frozen=True)
class Dial:
    target: str
    credentials: grpc.ChannelCredentials | None = None
    options: tuple[tuple[str, str | int], ...] = ()


LOCAL_SOCKET_OPTIONS: tuple[tuple[str, str | int], ...] = (
    # How long a connection may take to get the server's HTTP/2 settings (gRPC's default
    # is 20 s): a local daemon answers in milliseconds, and a listener that accepts and
    # never answers (a dead daemon's, kept by gVisor's gofer) must fail the call soon, as
    # Unavailable, so that the client redials.
    ("grpc.min_reconnect_backoff_ms", 2000),
)


class Connector(Protocol):
    async def dial(self) -> Dial: ...

    async def close(self) -> None: ...


ListenerId = tuple[int, int]
"""A socket file's ``(st_dev, st_ino)``: which listener a path leads to."""


def listener_at(path: Path) -> ListenerId | None:
    """Which socket file is at ``path`` now (a symlink is not followed); None: none."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISSOCK(info.st_mode) else None


@runtime_checkable
class DirectConnector(Protocol):
    """A connector that can also reach the daemon's direct attach channel."""

    async def connect_direct(self) -> socket.socket | None:
        """A connected non-blocking socket, or None when the daemon has no direct channel
        (the caller then attaches over gRPC)."""
        ...

    def direct_listener(self) -> ListenerId | None:
        """Which socket file is at the direct channel's path now (None: none). A client
        that dialled one and waits for its hello asks again to tell a slow daemon from a
        gone one (``forgehand.runner.direct``)."""
        ...


async def connect_unix(target: str) -> socket.socket | None:
    """A non-blocking connection to the unix socket ``target``, or None if nothing listens
    there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, target)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except BaseException:
        sock.close()
        raise
    return sock


class UnixConnector:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).absolute()
        self._direct = direct_socket_path(self.path)

    async def dial(self) -> Dial:
        return Dial(f"unix:{self.path}", options=LOCAL_SOCKET_OPTIONS)

    async def connect_direct(self) -> socket.socket | None:
        return None if self._direct is None else await connect_unix(str(self._direct))

    def direct_listener(self) -> ListenerId | None:
        return None if self._direct is None else listener_at(self._direct)

    async def close(self) -> None:
        return None


class TlsConnector:
    """TCP + TLS to ``address`` (host:port), trusting ``ca_cert`` (PEM bytes)."""

    def __init__(
        self, address: str, token: str, ca_cert: bytes | None = None, server_name: str = ""
    ) -> None:
        self.address = address
        self._credentials = channel_credentials(ca_cert, token)
        self._options: tuple[tuple[str, str | int], ...] = (
            (("grpc.ssl_target_name_override", server_name),) if server_name else ()
        )

    async def dial(self) -> Dial:
        return Dial(self.address, self._credentials, self._options)

    async def close(self) -> None:
        return None


class ExecConnector:
    """Reaches a runner through the stdin/stdout of ``argv`` (one process per connection)."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        if not argv:
            raise ValueError("ExecConnector needs a command")
        self.argv = list(argv)
        self.env = env
        self._dir: str | None = None
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    async def dial(self) -> Dial:
        async with self._lock:
            return await self._listen()

    async def _listen(self) -> Dial:
        if self._server is None:
            self._dir = tempfile.mkdtemp(prefix="fh-exec-")
            os.chmod(self._dir, 0o700)
            path = os.path.join(self._dir, "s")
            self._server = await asyncio.start_unix_server(self._on_connection, path)
        return Dial(f"unix:{self._dir}/s")

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pumps.add(task)
        try:
            await self._bridge(reader, writer)
        finally:
            writer.close()  # also when the channel never started, or we were cancelled
            self._pumps.discard(task)

    async def _bridge(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self.env,
        )
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            await pump_both(reader, writer, process.stdout, process.stdin)
        finally:
            writer.close()
            await _end(process)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._pumps):
                task.cancel()
            await asyncio.gather(*self._pumps, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        if self._dir is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._dir, "s"))
            with contextlib.suppress(OSError):
                os.rmdir(self._dir)
            self._dir = None


EXEC_EXIT_SECONDS = 2.0


async def _end(process: asyncio.subprocess.Process) -> None:
    """Close the exec channel's stdin, so the far end's proxy sees EOF even when the channel
    hands our pipe on (as `runsc exec` does); give it a moment to end, then kill it. Every
    wait is bounded."""
    if process.stdin is not None:
        process.stdin.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), EXEC_EXIT_SECONDS)
        return
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), EXEC_EXIT_SECONDS)
