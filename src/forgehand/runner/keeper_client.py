"""The daemon's side of the keeper: find or start it, send requests, receive notifications."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import json
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from forgehand.runner import errors
from forgehand.runner.keeper import FRAME, KeeperSettings, encode_frame, keeper_socket, serve

if TYPE_CHECKING:
    from forgehand.runner.config import RunnerConfig

log = logging.getLogger(__name__)

START_SECONDS = 30.0
REQUEST_SECONDS = 30.0


def keeper_settings(config: RunnerConfig) -> KeeperSettings:
    """What a daemon with ``config`` tells its keeper."""
    return KeeperSettings(
        state_dir=str(config.state_dir),
        journal_max_bytes=config.journal_max_bytes_per_run,
        memory_events=config.memory_events,
        roots=tuple(str(root) for root in config.file_roots()),
    )


@dataclass
class ForkedKeeper:
    """A keeper forked by ``fork_keeper``; ``wait`` for its answer before connecting."""

    ready_fd: int
    log_path: Path

    def wait(self, seconds: float = START_SECONDS) -> bool:
        """Block until the keeper answered; whether a keeper now serves the state dir
        (``ready``: this one; ``busy``: one that was already running)."""
        answer = _read_until_eof(self.ready_fd, seconds)
        os.close(self.ready_fd)
        if answer.strip() not in (b"ready", b"busy"):
            log.warning("the forked keeper did not start; see %s", self.log_path)
            return False
        return True


def fork_keeper(settings: KeeperSettings) -> ForkedKeeper | None:
    """Start the keeper by forking this daemon: call it after the imports, before any
    thread, event loop or gRPC object exists.

    Why: the keeper then shares the interpreter and every module with the daemon,
    copy-on-write (a sandbox's PSS counts those pages half in each), and it is ready in a
    millisecond instead of a new interpreter's 100 ms. It uses none of gRPC; importing
    gRPC starts no thread. The keeper detaches exactly as ``python -m
    forgehand.runner.keeper`` does: a new session, and an intermediate process that exits
    at once, so it belongs to no daemon and survives the daemon's SIGKILL. None when
    forking is unsafe (another thread runs) or the state dir is unusable.
    """
    if threading.active_count() > 1:
        return None
    log_path = Path(settings.state_dir) / "keeper.log"
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.warning("cannot fork the keeper (%s); the daemon will start one", exc)
        return None
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # the collector would otherwise touch, and so copy, every shared object
    try:
        pid = os.fork()
    except OSError as exc:  # e.g. the sandbox's pids limit
        for fd in (log_fd, read_fd, write_fd):
            os.close(fd)
        log.warning("cannot fork the keeper (%s); the daemon will start one", exc)
        return None
    if pid == 0:
        _become_keeper(settings, log_fd, read_fd, write_fd)
    os.close(write_fd)
    os.close(log_fd)
    os.waitpid(pid, 0)
    return ForkedKeeper(read_fd, log_path)


def _become_keeper(settings: KeeperSettings, log_fd: int, read_fd: int, write_fd: int) -> NoReturn:
    """The forked child: detach, trade the daemon's stdio for /dev/null and the log, serve."""
    code = 1
    try:
        os.close(read_fd)
        os.setsid()
        if os.fork():
            os._exit(0)
        # Above stdio first, so the dup2s below cannot clobber them; then only they remain.
        ready_fd = fcntl.fcntl(write_fd, fcntl.F_DUPFD_CLOEXEC, 3)
        log_fd = fcntl.fcntl(log_fd, fcntl.F_DUPFD_CLOEXEC, 3)
        null = os.open(os.devnull, os.O_RDWR)
        for target, source in ((0, null), (1, null), (2, log_fd)):
            os.dup2(source, target)
        os.closerange(3, ready_fd)
        os.closerange(ready_fd + 1, os.sysconf("SC_OPEN_MAX"))
        serve(settings, ready_fd)
        code = 0
    except BaseException:
        with contextlib.suppress(BaseException):
            import traceback

            traceback.print_exc()
    finally:
        os._exit(code)


def _read_until_eof(fd: int, seconds: float) -> bytes:
    deadline = time.monotonic() + seconds
    data = b""
    while (remaining := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 64)
        if not chunk:
            break
        data += chunk
    return data


class KeeperClient:
    """One connection to the keeper, multiplexing requests and notifications.

    ``on_notify(run_ids, ended_ids)`` is called for every notification; ``on_lost()`` when
    the connection drops (the keeper died). Requests raise ``FailedPrecondition`` for a
    keeper's refusal and ``Unavailable`` when the keeper is gone.
    """

    def __init__(
        self,
        settings: KeeperSettings,
        on_notify: Callable[[list[str], list[str]], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.on_notify = on_notify
        self.on_lost = on_lost
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[tuple[str, bytes]]] = {}
        self._next_id = 1

    @property
    def socket_path(self) -> Path:
        return keeper_socket(Path(self.settings.state_dir))

    async def connect(self) -> None:
        """Connect to the keeper of this state dir, starting one if none answers."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        except OSError:
            await self._start_keeper()
            reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read_loop(reader))

    async def _start_keeper(self) -> None:
        # The keeper outlives this daemon: it must not hold our stderr (a caller reading it
        # through a pipe would wait for the keeper to exit). It logs to a file instead.
        log_path = Path(self.settings.state_dir) / "keeper.log"
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            process = await self._spawn_keeper(log_fd)
        finally:
            os.close(log_fd)
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_SECONDS)
        except TimeoutError:
            line = b""
        await process.wait()  # the detaching parent; the keeper itself runs on
        if line.strip() != b"ready":
            raise errors.Internal(
                "the runner's keeper process did not start"
                + (": another keeper holds this state dir" if line.strip() == b"busy" else "")
                + f"; see {log_path}"
            )

    async def _spawn_keeper(self, log_fd: int) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "forgehand.runner.keeper",
            json.dumps(asdict(self.settings)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_fd,
            start_new_session=True,
        )

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._writer = self._reader_task = None
        self._fail_pending()

    async def request(self, kind: str, payload: bytes = b"") -> bytes:
        if self._writer is None:
            raise errors.Unavailable("the runner's keeper is not connected")
        ident = self._next_id
        self._next_id += 1
        future: asyncio.Future[tuple[str, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        try:
            self._writer.write(encode_frame(kind, ident, payload))
            await self._writer.drain()
            status, body = await asyncio.wait_for(future, REQUEST_SECONDS)
        except (OSError, TimeoutError) as exc:
            raise errors.Unavailable("the runner's keeper did not answer") from exc
        finally:
            self._pending.pop(ident, None)
        if status == "X":
            raise errors.FailedPrecondition(body.decode(errors="replace"))
        return body

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                kind, ident, length = FRAME.unpack(await reader.readexactly(FRAME.size))
                payload = await reader.readexactly(length) if length else b""
                self._on_frame(chr(kind), ident, payload)
        except (asyncio.IncompleteReadError, OSError):
            log.warning("lost the connection to the runner's keeper")
        self._writer = None
        self._fail_pending()
        self.on_lost()

    def _on_frame(self, kind: str, ident: int, payload: bytes) -> None:
        if ident == 0 and kind == "N":
            lines = payload.decode().split("\n")
            grown = [line for line in lines if line and not line.startswith("!")]
            ended = [line[1:] for line in lines if line.startswith("!")]
            self.on_notify(grown, ended)
            return
        future = self._pending.get(ident)
        if future is not None and not future.done():
            future.set_result((kind, payload))

    def _fail_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(errors.Unavailable("the runner's keeper went away"))
        self._pending.clear()
