"""The file RPCs (ReadFile, WriteFile, Stat, ListDir) over every transport.

The runner here has two roots, ``work`` (the first: relative paths land there) and
``other``; ``outside`` sits next to them and must stay out of reach whatever the path says.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner import errors
from forgehand.runner.client import RunnerClient
from forgehand.runner.config import RunnerConfig
from forgehand.runner.model import FileType

MIB = 1024 * 1024
SETTLE_SECONDS = 10.0
SECRET = b"outside the roots\n"


@pytest.fixture
def config(short_tmp: Path) -> RunnerConfig:
    """Overrides conftest's: two roots, so first-root resolution can be told apart."""
    roots = (short_tmp / "work", short_tmp / "other")
    for root in roots:
        root.mkdir()
    return RunnerConfig(state_dir=short_tmp / "state", roots=roots)


@pytest.fixture
def other(config: RunnerConfig) -> Path:
    return config.roots[1]


@pytest.fixture
def outside(short_tmp: Path, work: Path) -> Path:
    """A directory beside the roots, reachable from work by an escaping symlink."""
    directory = short_tmp / "outside"
    directory.mkdir()
    (directory / "secret.txt").write_bytes(SECRET)
    (work / "escape").symlink_to(directory)
    (work / "secret-link").symlink_to(directory / "secret.txt")
    (work / "dangling-out").symlink_to(directory / "not-yet.txt")
    return directory


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every path under directory with its content (None for directories)."""
    return {
        str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes()
        for p in sorted(directory.rglob("*"))
    }


def temp_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.part"))


async def settled(check: Callable[[], bool]) -> bool:
    """Whether check() becomes true within SETTLE_SECONDS: for server-side cleanup that
    finishes after the client has already seen its call end, so there is no event to await."""
    loop = asyncio.get_running_loop()
    end = loop.time() + SETTLE_SECONDS
    while not check():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.01)
    return True


async def write_parts(client: RunnerClient, parts: list[pb.WriteFileRequest]) -> pb.FileInfo:
    """WriteFile with exactly these messages, below RunnerClient's framing."""

    async def requests() -> AsyncIterator[pb.WriteFileRequest]:
        for part in parts:
            yield part

    response = await client.transport.write_file(requests(), 30.0)
    return response.info


def header(path: str, mode: int = 0, create_parents: bool = False) -> pb.WriteFileRequest:
    return pb.WriteFileRequest(
        header=pb.WriteFileHeader(path=path, mode=mode, create_parents=create_parents)
    )


def data(chunk: bytes) -> pb.WriteFileRequest:
    return pb.WriteFileRequest(data=chunk)


# -- WriteFile + ReadFile round trips --------------------------------------------------------


async def test_round_trip_keeps_every_byte(client: RunnerClient, work: Path) -> None:
    blob = b"\x00nul\x00" + bytes(range(256)) + b"\xff\xfe\xc3\x28 invalid utf-8 \x80\x00"
    info = await client.write_file("blob.bin", blob)
    assert info.type is FileType.REGULAR
    assert info.size == len(blob)
    assert info.path == str(work / "blob.bin")
    assert (work / "blob.bin").read_bytes() == blob
    assert await client.read_file("blob.bin") == blob


async def test_empty_file_round_trips(client: RunnerClient, work: Path) -> None:
    info = await client.write_file("empty", b"")
    assert info.size == 0
    assert (work / "empty").read_bytes() == b""
    assert await client.read_file("empty") == b""


async def test_five_mib_round_trip_is_chunked(client: RunnerClient, work: Path) -> None:
    blob = random.Random(7).randbytes(5 * MIB + 123)
    info = await client.write_file("big.bin", blob)
    assert info.size == len(blob)
    assert (work / "big.bin").read_bytes() == blob
    request = pb.ReadFileRequest(path="big.bin", chunk_bytes=MIB)
    chunks = [c async for c in client.transport.read_file(request, 30.0)]
    assert len(chunks) == 6
    assert [c.offset for c in chunks] == [i * MIB for i in range(6)]
    assert chunks[0].info.size == len(blob)
    assert not any(c.HasField("info") for c in chunks[1:])
    assert b"".join(c.data for c in chunks) == blob


async def test_write_from_uneven_async_chunks(client: RunnerClient, work: Path) -> None:
    pieces = [b"a" * 7, b"", b"\x00" * (MIB + 3), b"tail"]

    async def stream() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    await client.write_file("pieces.bin", stream())
    assert (work / "pieces.bin").read_bytes() == b"".join(pieces)


async def test_write_replaces_an_existing_file(client: RunnerClient, work: Path) -> None:
    (work / "f.txt").write_bytes(b"old content that is longer")
    await client.write_file("f.txt", b"new")
    assert (work / "f.txt").read_bytes() == b"new"


async def test_write_through_a_symlink_inside_the_roots_writes_its_target(
    client: RunnerClient, work: Path, other: Path
) -> None:
    (other / "target.txt").write_bytes(b"old")
    (work / "link").symlink_to(other / "target.txt")
    await client.write_file("link", b"new")
    assert (work / "link").is_symlink()
    assert (other / "target.txt").read_bytes() == b"new"


async def test_long_file_name_up_to_name_max(client: RunnerClient, work: Path) -> None:
    name = "n" * 255
    await client.write_file(name, b"long")
    assert (work / name).read_bytes() == b"long"
    assert temp_files(work) == []
    with pytest.raises(errors.InvalidArgument):
        await client.write_file("n" * 256, b"too long")


# -- ReadFile ranges and errors --------------------------------------------------------------

CONTENT = bytes(range(100))


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (0, 0, CONTENT),
        (3, 4, CONTENT[3:7]),
        (10, 0, CONTENT[10:]),
        (95, 1000, CONTENT[95:]),
        (100, 0, b""),
        (250, 5, b""),
        (2**63 - 1, 0, b""),
    ],
)
async def test_read_range(
    client: RunnerClient, work: Path, offset: int, length: int, expected: bytes
) -> None:
    (work / "range.bin").write_bytes(CONTENT)
    assert await client.read_file("range.bin", offset=offset, length=length) == expected


async def test_read_range_chunks_carry_their_offsets(client: RunnerClient, work: Path) -> None:
    (work / "range.bin").write_bytes(CONTENT)
    request = pb.ReadFileRequest(path="range.bin", offset=10, length=25, chunk_bytes=10)
    chunks = [c async for c in client.transport.read_file(request, 30.0)]
    assert [(c.offset, c.data) for c in chunks] == [
        (10, CONTENT[10:20]),
        (20, CONTENT[20:30]),
        (30, CONTENT[30:35]),
    ]


async def test_read_offset_past_off_t_is_invalid(client: RunnerClient, work: Path) -> None:
    (work / "range.bin").write_bytes(CONTENT)
    with pytest.raises(errors.InvalidArgument, match="offset"):
        await client.read_file("range.bin", offset=2**64 - 1)


async def test_read_missing_file_is_not_found(client: RunnerClient) -> None:
    with pytest.raises(errors.NotFound, match=r"nope\.txt"):
        await client.read_file("nope.txt")


async def test_read_below_a_regular_file_is_not_found(client: RunnerClient, work: Path) -> None:
    (work / "plain").write_bytes(b"x")
    with pytest.raises(errors.NotFound):
        await client.read_file("plain/inner")


async def test_read_directory_is_failed_precondition(client: RunnerClient, work: Path) -> None:
    (work / "sub").mkdir()
    with pytest.raises(errors.FailedPrecondition, match="directory"):
        await client.read_file("sub")


async def test_read_fifo_is_failed_precondition(client: RunnerClient, work: Path) -> None:
    os.mkfifo(work / "fifo")
    with pytest.raises(errors.FailedPrecondition, match="regular file"):
        await client.read_file("fifo")


# -- WriteFile: atomicity, modes, parents, errors --------------------------------------------


async def test_failed_write_leaves_the_old_file_and_no_temp(
    client: RunnerClient, work: Path
) -> None:
    (work / "keep.txt").write_bytes(b"old")
    parts = [header("keep.txt"), data(b"partial "), header("keep.txt"), data(b"more")]
    with pytest.raises(errors.InvalidArgument, match="header"):
        await write_parts(client, parts)
    assert (work / "keep.txt").read_bytes() == b"old"
    assert temp_files(work) == []


async def test_failed_write_of_a_new_file_leaves_nothing(client: RunnerClient, work: Path) -> None:
    with pytest.raises(errors.InvalidArgument):
        await write_parts(client, [header("new.txt"), data(b"x"), header("new.txt")])
    assert not (work / "new.txt").exists()
    assert temp_files(work) == []


async def test_write_without_header_is_invalid(client: RunnerClient, work: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="header"):
        await write_parts(client, [data(b"no header")])
    with pytest.raises(errors.InvalidArgument, match="header"):
        await write_parts(client, [])
    assert snapshot(work) == {}


async def test_aborted_write_leaves_the_old_file_and_no_temp(
    client: RunnerClient, work: Path, request: pytest.FixtureRequest
) -> None:
    (work / "keep.txt").write_bytes(b"old")
    release = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"first half of the new content"
        await release.wait()

    writing = asyncio.create_task(client.write_file("keep.txt", stalled()))
    assert await settled(lambda: bool(temp_files(work)) or writing.done())
    assert not writing.done(), "the write ended although its stream never closed"
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing
    release.set()
    assert await settled(lambda: not temp_files(work)), temp_files(work)
    assert (work / "keep.txt").read_bytes() == b"old"


@pytest.mark.parametrize(("mode", "expected"), [(0o600, 0o600), (0o755, 0o755), (0, 0o644)])
async def test_mode_bits_are_honoured(
    client: RunnerClient, work: Path, mode: int, expected: int
) -> None:
    info = await client.write_file("m.sh", b"#!/bin/sh\n", mode=mode)
    assert info.mode == expected
    assert (work / "m.sh").stat().st_mode & 0o7777 == expected


async def test_mode_of_a_replaced_file_is_the_new_one(client: RunnerClient, work: Path) -> None:
    (work / "m").write_bytes(b"")
    (work / "m").chmod(0o600)
    await client.write_file("m", b"x", mode=0o751)
    assert (work / "m").stat().st_mode & 0o7777 == 0o751


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o6777])
async def test_setuid_and_setgid_modes_are_rejected(
    client: RunnerClient, work: Path, mode: int
) -> None:
    with pytest.raises(errors.InvalidArgument, match="setuid"):
        await client.write_file("suid", b"x", mode=mode)
    assert snapshot(work) == {}


async def test_create_parents_makes_missing_directories(client: RunnerClient, work: Path) -> None:
    info = await client.write_file("a/b/c.txt", b"deep", create_parents=True)
    assert info.path == str(work / "a" / "b" / "c.txt")
    assert (work / "a" / "b" / "c.txt").read_bytes() == b"deep"
    assert (work / "a" / "b").stat().st_mode & 0o777 == 0o755


async def test_missing_parent_without_create_parents_is_not_found(
    client: RunnerClient, work: Path
) -> None:
    with pytest.raises(errors.NotFound, match="create_parents"):
        await client.write_file("x/y.txt", b"")
    assert snapshot(work) == {}


async def test_create_parents_through_a_file_fails(client: RunnerClient, work: Path) -> None:
    (work / "plain").write_bytes(b"x")
    with pytest.raises(errors.FailedPrecondition, match="not a directory"):
        await client.write_file("plain/sub/f.txt", b"", create_parents=True)
    assert (work / "plain").read_bytes() == b"x"


async def test_write_onto_a_directory_is_failed_precondition(
    client: RunnerClient, work: Path
) -> None:
    (work / "sub").mkdir()
    with pytest.raises(errors.FailedPrecondition, match="directory"):
        await client.write_file("sub", b"x")
    assert (work / "sub").is_dir()
    assert temp_files(work) == []


# -- Stat ------------------------------------------------------------------------------------


async def test_stat_regular_file(client: RunnerClient, work: Path) -> None:
    (work / "f.txt").write_bytes(b"12345")
    (work / "f.txt").chmod(0o640)
    info = await client.stat("f.txt")
    assert info.type is FileType.REGULAR
    assert info.size == 5
    assert info.mode == 0o640
    assert info.path == str(work / "f.txt")
    assert info.mtime_ns == (work / "f.txt").stat().st_mtime_ns
    assert info.symlink_target == ""


async def test_stat_directory(client: RunnerClient, work: Path) -> None:
    (work / "d").mkdir(mode=0o750)
    info = await client.stat("d")
    assert info.type is FileType.DIRECTORY
    assert info.mode == 0o750


async def test_stat_root_itself(client: RunnerClient, work: Path) -> None:
    assert (await client.stat(str(work))).type is FileType.DIRECTORY
    assert (await client.stat(".")).path == str(work)


async def test_stat_symlink_reports_itself_with_target(client: RunnerClient, work: Path) -> None:
    (work / "f.txt").write_bytes(b"12345")
    (work / "link").symlink_to("f.txt")
    (work / "dangling").symlink_to("no/such/file")
    info = await client.stat("link")
    assert info.type is FileType.SYMLINK
    assert info.symlink_target == "f.txt"
    assert info.path == str(work / "link")
    dangling = await client.stat("dangling")
    assert dangling.type is FileType.SYMLINK
    assert dangling.symlink_target == "no/such/file"


async def test_stat_escaping_symlink_describes_only_the_link(
    client: RunnerClient, outside: Path
) -> None:
    info = await client.stat("secret-link")
    assert info.type is FileType.SYMLINK
    assert info.symlink_target == str(outside / "secret.txt")
    assert info.size == len(info.symlink_target)


async def test_stat_missing_is_not_found(client: RunnerClient, work: Path) -> None:
    (work / "plain").write_bytes(b"x")
    with pytest.raises(errors.NotFound):
        await client.stat("missing")
    with pytest.raises(errors.NotFound):
        await client.stat("plain/below-a-file")
    with pytest.raises(errors.NotFound):
        await client.stat("missing-dir/f")


async def test_stat_name_too_long_is_invalid(client: RunnerClient) -> None:
    with pytest.raises(errors.InvalidArgument):
        await client.stat("n" * 300)


# -- ListDir ---------------------------------------------------------------------------------


async def test_list_dir_sorted_with_types(client: RunnerClient, work: Path) -> None:
    for name in ("c.txt", "a.txt", "B.txt"):
        (work / "d" / name).parent.mkdir(exist_ok=True)
        (work / "d" / name).write_bytes(name.encode())
    (work / "d" / "sub").mkdir()
    (work / "d" / "ln").symlink_to("a.txt")
    entries, truncated = await client.list_dir("d")
    assert not truncated
    assert [e.path for e in entries] == [
        str(work / "d" / n) for n in ("B.txt", "a.txt", "c.txt", "ln", "sub")
    ]
    kinds = {Path(e.path).name: e.type for e in entries}
    assert kinds["sub"] is FileType.DIRECTORY
    assert kinds["ln"] is FileType.SYMLINK
    assert kinds["a.txt"] is FileType.REGULAR
    assert {Path(e.path).name: e.size for e in entries}["c.txt"] == 5


@pytest.mark.parametrize(
    ("limit", "count", "truncated"), [(2, 2, True), (5, 5, False), (0, 5, False)]
)
async def test_list_dir_max_entries(
    client: RunnerClient, work: Path, limit: int, count: int, truncated: bool
) -> None:
    for i in range(5):
        (work / f"f{i}").write_bytes(b"")
    entries, was_truncated = await client.list_dir(".", max_entries=limit)
    assert [Path(e.path).name for e in entries] == [f"f{i}" for i in range(count)]
    assert was_truncated is truncated


async def test_list_dir_empty(client: RunnerClient, work: Path) -> None:
    assert await client.list_dir(str(work)) == ([], False)


async def test_list_dir_missing_is_not_found(client: RunnerClient) -> None:
    with pytest.raises(errors.NotFound):
        await client.list_dir("no-such-dir")


async def test_list_dir_of_a_file_is_failed_precondition(client: RunnerClient, work: Path) -> None:
    (work / "plain").write_bytes(b"x")
    with pytest.raises(errors.FailedPrecondition, match="not a directory"):
        await client.list_dir("plain")


# -- roots: relative paths, second root, confinement -----------------------------------------


async def test_relative_paths_resolve_against_the_first_root(
    client: RunnerClient, work: Path, other: Path
) -> None:
    await client.write_file("rel.txt", b"first")
    assert (work / "rel.txt").read_bytes() == b"first"
    assert not (other / "rel.txt").exists()
    assert (await client.stat("rel.txt")).path == str(work / "rel.txt")
    assert [e.path for e in (await client.list_dir("."))[0]] == [str(work / "rel.txt")]


async def test_every_root_is_reachable_by_absolute_path(client: RunnerClient, other: Path) -> None:
    path = str(other / "o.txt")
    await client.write_file(path, b"second root")
    assert await client.read_file(path) == b"second root"
    assert (await client.stat(path)).size == len(b"second root")
    assert [e.path for e in (await client.list_dir(str(other)))[0]] == [path]
    assert await client.read_file("../other/o.txt") == b"second root"


Op = Callable[[RunnerClient, str], Awaitable[object]]


async def _read(client: RunnerClient, path: str) -> object:
    return await client.read_file(path)


async def _write(client: RunnerClient, path: str) -> object:
    return await client.write_file(path, b"overwritten")


async def _write_parents(client: RunnerClient, path: str) -> object:
    return await client.write_file(path, b"overwritten", create_parents=True)


async def _stat(client: RunnerClient, path: str) -> object:
    return await client.stat(path)


async def _list_dir(client: RunnerClient, path: str) -> object:
    return await client.list_dir(path)


OPS: dict[str, Op] = {
    "read": _read,
    "write": _write,
    "write-parents": _write_parents,
    "stat": _stat,
    "list_dir": _list_dir,
}

# (operation, path); "{outside}" is replaced with the outside directory.
ESCAPES = [
    ("read", "{outside}/secret.txt"),
    ("write", "{outside}/secret.txt"),
    ("write", "{outside}/new.txt"),
    ("stat", "{outside}/secret.txt"),
    ("list_dir", "{outside}"),
    ("list_dir", "/"),
    ("read", "../outside/secret.txt"),
    ("write", "../outside/secret.txt"),
    ("stat", "../outside/secret.txt"),
    ("list_dir", ".."),
    ("list_dir", "sub/../../outside"),
    ("read", "escape/secret.txt"),
    ("write", "escape/secret.txt"),
    ("write", "escape/new.txt"),
    ("stat", "escape/secret.txt"),
    ("list_dir", "escape"),
    ("list_dir", "escape/"),
    ("read", "secret-link"),
    ("write", "secret-link"),
    ("write", "dangling-out"),
    ("write-parents", "escape/newdir/f.txt"),
    ("write-parents", "missing/../../outside/newdir/f.txt"),
    ("write-parents", "{outside}/newdir/f.txt"),
]


@pytest.mark.parametrize(("op", "path"), ESCAPES)
async def test_escapes_are_permission_denied(
    client: RunnerClient, work: Path, outside: Path, op: str, path: str
) -> None:
    (work / "sub").mkdir()
    before = snapshot(outside)
    with pytest.raises(errors.PermissionDenied, match="outside the runner's roots"):
        await OPS[op](client, path.format(outside=outside))
    assert snapshot(outside) == before
    assert (work / "secret-link").is_symlink()
    assert temp_files(work) == []


@pytest.mark.parametrize("op", ["read", "write", "write-parents", "stat", "list_dir"])
@pytest.mark.parametrize("path", ["", "a\0b", "\0", "n/" * 2049])
async def test_bad_paths_are_invalid_argument(client: RunnerClient, op: str, path: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="path"):
        await OPS[op](client, path)
