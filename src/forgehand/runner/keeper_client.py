"""The daemon's side of the keeper: find or start it, send requests, receive notifications.

The keeper is a small compiled program (``keeper.c``, built by ``scripts/build-keeper``
beside this module) that owns every run's process, pipes and journal, so the daemon may
die at any moment without a run noticing. It is started one of two ways:

- ``forgehand-keeper serve``: by the daemon, when no keeper answers on the state dir's
  socket (``KeeperClient.connect``). It detaches, so it outlives the daemon.
- ``forgehand-keeper supervise … -- DAEMON``: as a sandbox's own process
  (``keeper_launch.supervise_argv``; ``forgehand-runner serve --supervise`` execs the
  same): it starts the daemon as its child and restarts it when it crashes.

Wire protocol, on one unix socket connection (``<state_dir>/keeper.sock``), frames
``u8 kind | u32 id | u32 length | payload``, little-endian. Requests (id > 0) get exactly
one reply with the same id: ``O`` (ok, payload depends on the request) or ``X`` (error
message). Frames with id 0 are notifications: ``N`` with newline-separated run ids whose
journal grew, and ``!<run id>`` for runs that ended.

    S start   payload: serialized KeeperStart (``keeper_start``)  → O: pid (ascii; 0 when the
                                                                       spawn failed, which the
                                                                       journal tells)
    I stdin   run_id NUL eof-flag-byte data    → O once the data is in the pipe (and, with
                                                   the flag, stdin is closed)
    R resize  run_id NUL u16 rows u16 cols      → O
    C cancel  run_id NUL f64 grace              → O: "1" if it was running
    L live    (empty)                            → O: newline-separated running run ids

The keeper exits once no daemon has been connected and no run has been running for a
minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import struct
from collections.abc import Callable
from pathlib import Path

from forgehand.runner import errors
from forgehand.runner.keeper_launch import (
    KeeperSettings,
    keeper_arguments,
    keeper_binary,
    missing_keeper,
)

log = logging.getLogger(__name__)

FRAME = struct.Struct("<BII")
START_SECONDS = 30.0
REQUEST_SECONDS = 30.0


def encode_frame(kind: str, ident: int, payload: bytes = b"") -> bytes:
    return FRAME.pack(ord(kind), ident, len(payload)) + payload


def keeper_socket(state_dir: Path) -> Path:
    return state_dir / "keeper.sock"


def keeper_pid(state_dir: Path) -> int:
    """The pid of the keeper of a state dir (it holds the flock on keeper.lock), or 0."""
    try:
        inode = (state_dir / "keeper.lock").stat().st_ino
        locks = Path("/proc/locks").read_text()
    except OSError:
        return 0
    for line in locks.splitlines():
        parts = line.split()
        if len(parts) > 5 and parts[5].endswith(f":{inode}") and parts[4].isdigit():
            return int(parts[4])
    return 0


def stop_keeper(state_dir: Path) -> bool:
    """Kill the keeper of a state dir now (it also exits by itself after being idle for a
    minute). Every run it still has ends as lost. Returns whether one ran."""
    pid = keeper_pid(state_dir)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return bool(pid)


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
        missing = missing_keeper()
        if missing:
            raise errors.FailedPrecondition(missing)
        return await asyncio.create_subprocess_exec(
            str(keeper_binary()),
            "serve",
            *keeper_arguments(self.settings),
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
