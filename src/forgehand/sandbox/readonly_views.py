"""Read-only views of host paths, read-only in the host kernel's own mount table.

gVisor's gofer serves each bind mount of a bundle from a bind mount in its own mount
namespace. runsc 2024-07 makes those writable there, even for mounts the bundle says are
``ro``: the Sentry refuses writes, and the gofer refuses them again per request. Its
``BindAt`` (``--host-uds=create``) is the one request it does not check, so a Sentry that
gave it a read-only directory would get a socket file created in the host's ``/usr``.
Binding a view of such a path here first, read-only, and giving the bundle the view
makes the host kernel refuse every write below it too (the gofer inherits the flag and
has no ``CAP_SYS_ADMIN`` to clear it)::

    bind_read_only(Path("/usr"), state / "ro" / "0")   # blocking
    ...
    release_below(state / "ro")                         # after the sandbox is gone

All blocking: call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from pathlib import Path

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 0x2
MOUNTINFO = Path("/proc/self/mountinfo")
_ESCAPE = re.compile(r"\\([0-7]{3})")


def bind_read_only(source: Path, target: Path) -> None:
    """Bind ``source`` (with its submounts) at ``target`` (made here: a directory, or an
    empty file for a file) and make every mount of it read-only, nosuid and nodev."""
    if source.is_dir():
        target.mkdir(mode=0o700)
    else:
        target.touch(mode=0o600, exist_ok=False)
    _mount(source, target, MS_BIND | MS_REC)
    for point, options in _mounts_below(target):
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
        _mount(None, point, flags | (MS_NOEXEC if "noexec" in options else 0))


def release_below(root: Path) -> None:
    """Detach every mount at or below ``root`` (none left is fine)."""
    for _ in range(64):
        points = [point for point, _ in _mounts_below(root)]
        if not points:
            return
        for point in sorted(points, key=lambda p: len(p.parts)):
            _detach(point)
    raise OSError(errno.EBUSY, f"mounts below {root} keep coming back")


def is_read_only(path: Path) -> bool:
    """Whether the mount that holds ``path`` is read-only (a path through ``/proc/PID/root``
    is looked up in that process's mounts)."""
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def _mounts_below(root: Path) -> list[tuple[Path, set[str]]]:
    found = []
    for line in MOUNTINFO.read_text().splitlines():
        fields = line.split()
        point = Path(_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4]))
        if point == root or point.is_relative_to(root):
            found.append((point, set(fields[5].split(","))))
    return found


def _mount(source: Path | None, target: Path, flags: int) -> None:
    src = None if source is None else os.fsencode(source)
    if _libc().mount(src, os.fsencode(target), None, flags, None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount {source} on {target} failed: {os.strerror(code)}")


def _detach(point: Path) -> None:
    if _libc().umount2(os.fsencode(point), MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):  # gone with its parent already
            raise OSError(code, f"umount {point} failed: {os.strerror(code)}")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
