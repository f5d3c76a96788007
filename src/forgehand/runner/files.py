"""File operations confined to the runner's roots.

A path is taken relative to the first root unless absolute, then resolved with every
symlink followed; the result must lie inside one of the roots, or the call fails with
PERMISSION_DENIED (this covers ``..`` and symlinks pointing out). ``Stat`` and ``ListDir``
describe a symlink itself rather than its target, but only after its parent directory
passed the same test. Writes go to a temporary file beside the target and are renamed into
place once complete, so a reader never sees half a file; writing to a symlink writes its
target, which must pass the same test. Blocking file-system calls run in worker threads, and
their ``OSError``s leave as ``RunnerError``s naming the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat as stat_module
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner import errors

DEFAULT_CHUNK = 1024 * 1024
MAX_CHUNK = 4 * 1024 * 1024
DEFAULT_MAX_ENTRIES = 10_000
MAX_PATH = 4096
MAX_OFFSET = 2**63 - 1  # off_t
TEMP_PREFIX_CHARS = 200  # room for mkstemp's suffix within NAME_MAX
T = TypeVar("T")


class FileService:
    """The file RPCs' implementation, shared by the gRPC servicer and the local client."""

    def __init__(self, roots: Sequence[Path]) -> None:
        if not roots:
            raise ValueError("FileService needs at least one root")
        self.roots = tuple(Path(os.path.realpath(r)) for r in roots)

    # -- confinement --------------------------------------------------------------------

    def _candidate(self, path: str) -> Path:
        if not path or len(path) > MAX_PATH or "\0" in path:
            raise errors.InvalidArgument("path must be 1 to 4096 characters without NUL")
        return Path(path) if os.path.isabs(path) else self.roots[0] / path

    def _inside(self, resolved: Path, original: str) -> Path:
        if any(resolved == root or resolved.is_relative_to(root) for root in self.roots):
            return resolved
        raise errors.PermissionDenied(
            f"{original!r} is outside the runner's roots ({', '.join(map(str, self.roots))})"
        )

    def resolve(self, path: str) -> Path:
        """The fully resolved path, which must lie inside a root."""
        return self._inside(Path(os.path.realpath(self._candidate(path))), path)

    def resolve_entry(self, path: str) -> Path:
        """Parent resolved and confined; the last component kept as is (may be a symlink)."""
        candidate = self._candidate(path)
        if candidate.name in ("", ".", ".."):
            return self.resolve(path)
        entry = Path(os.path.realpath(candidate.parent)) / candidate.name
        if entry in self.roots:  # a root itself, whose parent lies outside
            return entry
        return self._inside(entry.parent, path) / candidate.name

    # -- operations ---------------------------------------------------------------------

    async def stat(self, path: str) -> pb.FileInfo:
        entry = self.resolve_entry(path)
        return await asyncio.to_thread(_info, entry, path)

    async def list_dir(self, path: str, max_entries: int = 0) -> pb.ListDirResponse:
        directory = self.resolve(path)
        limit = min(max_entries or DEFAULT_MAX_ENTRIES, DEFAULT_MAX_ENTRIES)
        return await asyncio.to_thread(_list_dir, directory, path, limit)

    async def read(self, request: pb.ReadFileRequest) -> AsyncIterator[pb.ReadFileResponse]:
        resolved = self.resolve(request.path)
        if request.offset > MAX_OFFSET:
            raise errors.InvalidArgument(f"offset must be at most {MAX_OFFSET}")
        chunk = min(request.chunk_bytes or DEFAULT_CHUNK, MAX_CHUNK)
        fd = await _in_thread(_open_regular, resolved, request.path, undo=os.close)
        try:
            info = await asyncio.to_thread(_info, resolved, request.path)
            offset, remaining = request.offset, request.length or -1
            first = True
            while remaining != 0:
                size = chunk if remaining < 0 else min(chunk, remaining)
                size = min(size, MAX_OFFSET - offset)  # pread fails past the largest off_t
                data = await _in_thread(_pread, fd, size, offset, request.path)
                if not data and not first:
                    return
                yield pb.ReadFileResponse(data=data, offset=offset, info=info if first else None)
                first = False
                if not data:
                    return
                offset += len(data)
                remaining = remaining - len(data) if remaining > 0 else remaining
        finally:
            os.close(fd)

    async def write(self, requests: AsyncIterator[pb.WriteFileRequest]) -> pb.WriteFileResponse:
        header = await _first_header(requests)
        mode = header.mode & 0o7777 if header.mode else 0o644
        if mode & (stat_module.S_ISUID | stat_module.S_ISGID):
            raise errors.InvalidArgument("setuid and setgid bits may not be written")
        target = await self._prepare_target(header)
        fd, tmp = await _in_thread(_temp_beside, target, header.path, undo=_discard)
        try:
            committed = False
            async for part in requests:
                kind = part.WhichOneof("part")
                if committed or kind == "header" or kind is None:
                    raise errors.InvalidArgument(
                        "WriteFile takes one header, then data, then commit=true last"
                    )
                if kind == "commit":
                    committed = part.commit
                    continue
                await _in_thread(_write_all, fd, part.data, header.path)
            # A cancelled client's stream can end like a finished one: only an explicit
            # commit puts the file in place.
            if not committed:
                raise errors.FailedPrecondition(
                    f"WriteFile of {header.path!r} ended without commit: nothing was written"
                )
        except BaseException:
            _discard((fd, tmp))
            raise
        await _in_thread(_commit, fd, tmp, target, mode, header.path)
        return pb.WriteFileResponse(info=await asyncio.to_thread(_info, target, header.path))

    async def _prepare_target(self, header: pb.WriteFileHeader) -> Path:
        candidate = self._candidate(header.path)
        if header.create_parents:
            await asyncio.to_thread(self._make_parents, candidate.parent, header.path)
        return await asyncio.to_thread(self._target, header.path)

    def _target(self, path: str) -> Path:
        """Where a write to path lands: a symlink's target, confined like any path."""
        target = self.resolve_entry(path)
        kind = _kind(target, path)
        if kind == stat_module.S_IFLNK:
            target = self.resolve(path)
            kind = _kind(target, path)
        if kind == stat_module.S_IFDIR:
            raise errors.FailedPrecondition(f"{path!r} is a directory")
        if _kind(target.parent, path) != stat_module.S_IFDIR:
            raise errors.NotFound(f"directory of {path!r} does not exist: set create_parents")
        return target

    def _make_parents(self, directory: Path, original: str) -> None:
        missing = []
        while not _exists(directory, original) and directory != directory.parent:
            missing.append(directory.name)
            directory = directory.parent
        current = self._inside(Path(os.path.realpath(directory)), original)
        for name in reversed(missing):
            current = current / name
            try:
                current.mkdir(mode=0o755)
            except FileExistsError:
                pass
            except NotADirectoryError:
                raise errors.FailedPrecondition(
                    f"a parent of {original!r} is not a directory"
                ) from None
            except OSError as exc:
                raise os_error(exc, original, "cannot create the directories of") from None
            current = self._inside(Path(os.path.realpath(current)), original)


def os_error(exc: OSError, original: str, doing: str) -> errors.RunnerError:
    """The RunnerError for an OSError met while ``doing`` something to ``original``."""
    message = f"{doing} {original!r}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return errors.NotFound(message)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return errors.PermissionDenied(message)
    if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL):
        return errors.InvalidArgument(message)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EMFILE, errno.ENFILE):
        return errors.ResourceExhausted(message)
    if exc.errno in (errno.EISDIR, errno.ELOOP, errno.EEXIST, errno.ENOTEMPTY):
        return errors.FailedPrecondition(message)
    return errors.Internal(message)


def _exists(path: Path, original: str) -> bool:
    """Whether path exists, following symlinks (a dangling one does not)."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise os_error(exc, original, "cannot look up") from None
    return True


def _kind(path: Path, original: str) -> int:
    """The file type bits of path itself (0 if it does not exist)."""
    try:
        return stat_module.S_IFMT(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    except OSError as exc:
        raise os_error(exc, original, "cannot look up") from None


async def _in_thread(
    func: Callable[..., T], *args: object, undo: Callable[[T], object] | None = None
) -> T:
    """func(*args) in a worker thread. A thread cannot be stopped, so when the caller is
    cancelled this waits for func to end (no fd is closed under it) and undoes its result."""
    job = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            result = await job
            if undo is not None:
                undo(result)
        raise


def _discard(temp: tuple[int, str]) -> None:
    fd, path = temp
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(path)


async def _first_header(requests: AsyncIterator[pb.WriteFileRequest]) -> pb.WriteFileHeader:
    async for first in requests:
        if first.WhichOneof("part") != "header":
            raise errors.InvalidArgument("the first WriteFile message must carry the header")
        return first.header
    raise errors.InvalidArgument("WriteFile got no messages: send a header first")


def _open_regular(path: Path, original: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise errors.NotFound(f"no file {original!r}") from exc
    except OSError as exc:
        raise os_error(exc, original, "cannot open") from None
    mode = os.fstat(fd).st_mode
    if not stat_module.S_ISREG(mode):
        os.close(fd)
        if stat_module.S_ISDIR(mode):  # open(O_RDONLY) succeeds on a directory
            raise errors.FailedPrecondition(f"{original!r} is a directory: use ListDir")
        raise errors.FailedPrecondition(f"{original!r} is not a regular file")
    return fd


def _pread(fd: int, size: int, offset: int, original: str) -> bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError as exc:
        raise os_error(exc, original, "cannot read") from None


def _temp_beside(target: Path, original: str) -> tuple[int, str]:
    prefix = f".{target.name[:TEMP_PREFIX_CHARS]}."
    try:
        return tempfile.mkstemp(prefix=prefix, suffix=".part", dir=target.parent)
    except OSError as exc:
        raise os_error(exc, original, "cannot create a temporary file for") from None


def _write_all(fd: int, data: bytes, original: str) -> None:
    view = memoryview(data)
    try:
        while view:
            written = os.write(fd, view)
            view = view[written:]
    except OSError as exc:
        raise os_error(exc, original, "cannot write") from None


def _commit(fd: int, tmp: str, target: Path, mode: int, original: str) -> None:
    """Rename the temporary file into place; it is gone afterwards whatever happened."""
    try:
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise os_error(exc, original, "cannot write") from None


def _file_type(mode: int) -> pb.FileType.ValueType:
    if stat_module.S_ISREG(mode):
        return pb.FILE_TYPE_REGULAR
    if stat_module.S_ISDIR(mode):
        return pb.FILE_TYPE_DIRECTORY
    if stat_module.S_ISLNK(mode):
        return pb.FILE_TYPE_SYMLINK
    return pb.FILE_TYPE_OTHER


def _info(path: Path, original: str) -> pb.FileInfo:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise errors.NotFound(f"no file {original!r}") from exc
    except OSError as exc:
        raise os_error(exc, original, "cannot stat") from None
    info = pb.FileInfo(
        path=str(path),
        type=_file_type(st.st_mode),
        size=st.st_size,
        mode=stat_module.S_IMODE(st.st_mode),
        mtime_unix_ns=st.st_mtime_ns,
    )
    if stat_module.S_ISLNK(st.st_mode):
        with contextlib.suppress(OSError):  # replaced since the lstat: report no target
            info.symlink_target = os.readlink(path)
    return info


def _list_dir(directory: Path, original: str, limit: int) -> pb.ListDirResponse:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError as exc:
        raise errors.NotFound(f"no directory {original!r}") from exc
    except NotADirectoryError as exc:
        raise errors.FailedPrecondition(f"{original!r} is not a directory") from exc
    except OSError as exc:
        raise os_error(exc, original, "cannot list") from None
    response = pb.ListDirResponse(truncated=len(names) > limit)
    for name in names[:limit]:
        with contextlib.suppress(errors.NotFound):
            response.entries.append(_info(directory / name, name))
    return response
