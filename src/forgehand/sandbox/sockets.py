"""Connecting to a runner's socket in a directory its sandbox can write.

Backends whose runner listens on a unix socket in a host directory bind-mounted into the
sandbox (bwrap, podman) give the sandbox write access to that directory, so the name on
the host is under the sandbox's control.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from forgehand.runner import errors as runner_errors
from forgehand.runner.client.connectors import (
    LOCAL_SOCKET_OPTIONS,
    Dial,
    ListenerId,
    connect_unix,
    listener_at,
)
from forgehand.runner.config import direct_socket_path


class PinnedSocketConnector:
    """The runner's socket in a host directory the sandbox can write (``mount_sock_dir``).

    The sandbox could put a symlink there in place of its socket, pointing at any socket
    of the host, which this (root) process would then follow. So every dial opens the
    path with ``O_PATH | O_NOFOLLOW``, refuses anything but a socket of the sandbox user,
    and the connection goes through ``/proc/self/fd/N``: that very inode, whatever the
    name points at later. A new inode (the runner restarted and bound its socket again)
    replaces the pinned one; the same inode keeps its descriptor."""

    def __init__(self, path: Path, uid: int) -> None:
        self.path = path
        self.uid = uid
        self._fd = -1
        self._direct = direct_socket_path(path)

    async def dial(self) -> Dial:
        # Inline, like connect_direct: an open and an fstat on a local tmpfs. In a thread,
        # a dial cancelled meanwhile lost the descriptor the thread then returned, and
        # the pinned socket kept its tmpfs busy, so the sandbox's teardown failed.
        fd = pin_socket(self.path, self.uid)
        if self._fd >= 0 and _same_file(fd, self._fd):
            os.close(fd)
        else:
            old, self._fd = self._fd, fd
            if old >= 0:
                os.close(old)
        return Dial(f"unix:/proc/self/fd/{self._fd}", options=LOCAL_SOCKET_OPTIONS)

    async def connect_direct(self) -> socket.socket | None:
        """The daemon's direct attach channel, pinned the same way (a fresh pin per
        connection: an open and an fstat, no thread). None when it is not there."""
        if self._direct is None:
            return None
        try:
            fd = pin_socket(self._direct, self.uid)
        except runner_errors.Unavailable:
            return None
        try:
            return await connect_unix(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)

    def direct_listener(self) -> ListenerId | None:
        return None if self._direct is None else listener_at(self._direct)

    async def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _same_file(a: int, b: int) -> bool:
    first, second = os.fstat(a), os.fstat(b)
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def pin_socket(path: Path, uid: int) -> int:
    """An ``O_PATH`` descriptor of the unix socket ``path``, owned by ``uid`` (blocking)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise runner_errors.Unavailable(f"the runner's socket {path} does not exist yet") from None
    info = os.fstat(fd)
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != uid:
        os.close(fd)
        raise runner_errors.PermissionDenied(
            f"{path} is not a socket of uid {uid}: the sandbox replaced its runner's socket "
            "(a symlink?), so it is not connected to; destroy the sandbox"
        )
    return fd
