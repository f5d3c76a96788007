"""The journal's reference writer: ``JournalWriter`` as the Python keeper had it, before
the keeper was compiled (``src/forgehand/runner/keeper.c`` is the writer in production).

The reader's tests write journals with it, byte for byte in the format keeper.c writes
(``forgehand.runner.journal``'s docstring), so they can build any journal they need
(torn tails, gaps, a full disk) without a keeper; ``test_keeper_binary`` checks keeper.c's
journals through the same reader.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner.journal import (
    EXIT_FILE,
    HEADER,
    LENGTH_BITS,
    TRUNCATION,
    TRUNCATIONS_FILE,
    WORD_SEQ,
    _check_length,
    encode_record,
    segment_name,
    varint,
)

EXIT_RESERVE_BYTES = 4096
MAX_PREFIX_CRC = (1 << (32 - LENGTH_BITS)) - 1  # the largest P: 63 bytes
MAX_SEGMENT_BYTES = 4 * 1024 * 1024


def _output_prefix(seq: int, stream: int, size: int) -> bytes:
    """The serialized Output Event of ``size`` bytes of data, up to where the data begins."""
    output = b"\x08" + varint(stream) + b"\x12" + varint(size)
    head = [b"\x08", varint(seq), b"\x10", varint(time.time_ns()), b"\x22"]
    return b"".join([*head, varint(len(output) + size), output])


def _output_header(seq: int, prefix: bytes, size: int, data_head: bytes = b"") -> bytes:
    """Header and prefix of an output record of ``size`` data bytes. Its checksum covers
    the header's word and seq, the prefix and ``data_head`` (the data's first bytes, if the
    caller has them), which make P."""
    length = len(prefix) + size
    _check_length(length)
    covered = len(prefix) + len(data_head)
    word = length | covered << LENGTH_BITS
    crc = zlib.crc32(data_head, zlib.crc32(prefix, zlib.crc32(WORD_SEQ.pack(word, seq))))
    return HEADER.pack(word, crc, seq) + prefix


@dataclass
class _Segment:
    first_seq: int
    path: str
    size: int = 0
    last_seq: int = 0
    output_bytes: int = 0
    head: bool = False


@dataclass
class JournalWriter:
    """Appends a run's events. Owned by exactly one process, the run's supervisor."""

    directory: Path
    max_bytes: int
    segment_bytes: int = 0
    next_seq: int = 1
    total_bytes: int = 0
    _segments: list[_Segment] = field(default_factory=list)
    _fd: int = -1
    _exit_fd: int = -1
    _dir: str = ""

    def __post_init__(self) -> None:
        if self.segment_bytes <= 0:
            # Small enough that a resumed reader finds its place quickly, large enough that
            # the middle is dropped in useful pieces.
            self.segment_bytes = min(MAX_SEGMENT_BYTES, max(64 * 1024, self.max_bytes // 16))
        self._dir = os.fspath(self.directory)
        os.makedirs(self._dir, exist_ok=True)
        self._reserve_exit_record()
        self._open_segment(self.next_seq)

    def _reserve_exit_record(self) -> None:
        path = os.path.join(self._dir, EXIT_FILE)
        self._exit_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.posix_fallocate(self._exit_fd, 0, EXIT_RESERVE_BYTES)

    def _open_segment(self, first_seq: int) -> None:
        path = os.path.join(self._dir, segment_name(first_seq))
        head = self.total_bytes < self.max_bytes // 2
        # Not O_APPEND: splice refuses such a target. Records go at explicit offsets, the
        # segment's size, which only this writer changes.
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        size = os.fstat(self._fd).st_size
        self.total_bytes += size
        self._segments.append(_Segment(first_seq, path, size=size, head=head))

    def append(self, event: pb.Event) -> int:
        """Assign the next seq and time to the event, append it, return the seq.

        Raises OSError (ENOSPC and the like) when the disk refuses the write.
        """
        return self._append(event, rotate=True)

    def _append(self, event: pb.Event, rotate: bool) -> int:
        seq = self.next_seq
        event.seq = seq
        if not event.time_unix_ns:
            event.time_unix_ns = time.time_ns()
        record = encode_record(seq, event.SerializeToString())
        self._write_whole([record], len(record))
        self.next_seq = seq + 1
        output = len(event.output.data) if event.HasField("output") else 0
        self._account(len(record), seq, output, rotate)
        return seq

    def append_output(self, stream: int, data: bytes) -> int:
        """``append`` of an Output event, encoded here rather than by protobuf: the data is
        not copied into a message, a serialization and a record, only into the file."""
        seq = self.next_seq
        prefix = _output_prefix(seq, stream, len(data))
        head = _output_header(seq, prefix, len(data), data[: MAX_PREFIX_CRC - len(prefix)])
        self._write_whole([head, data], len(head) + len(data))
        self.next_seq = seq + 1
        self._account(len(head) + len(data), seq, len(data))
        return seq

    def splice_output(self, stream: int, pipe: int, size: int) -> int:
        """``append_output`` of the next ``size`` bytes of a pipe, which holds at least that
        many: header and prefix are written, then the data is moved with ``splice`` and
        never enters this process.

        Raises OSError: ENOSPC as ``append_output`` does (also for a short splice: what
        it took from the pipe is lost); EINVAL or ENOSYS when the journal's file system
        cannot splice, and then nothing was taken from the pipe.
        """
        seq = self.next_seq
        head = _output_header(seq, _output_prefix(seq, stream, size), size)
        start = self._segments[-1].size
        end = start + len(head) + size
        try:
            if os.pwrite(self._fd, head, start) != len(head):
                raise OSError(errno.ENOSPC, "the journal's disk is full")
            self._splice_all(pipe, start + len(head), end)
        except OSError:
            os.ftruncate(self._fd, start)
            raise
        self.next_seq = seq + 1
        self._account(end - start, seq, size)
        return seq

    def _splice_all(self, pipe: int, offset: int, end: int) -> None:
        """Move end - offset bytes from the pipe to the segment at offset. The first
        splice's error goes up as it is (nothing was taken); a short one is ENOSPC."""
        moved = self._splice(pipe, offset, end)
        while moved > 0 and offset + moved < end:
            offset += moved
            try:
                moved = self._splice(pipe, offset, end)
            except OSError:
                moved = 0
        if offset + moved < end:
            raise OSError(errno.ENOSPC, "the journal's disk is full")

    def _splice(self, pipe: int, offset: int, end: int) -> int:
        flags = os.SPLICE_F_NONBLOCK  # the pipe holds the data; never wait for more
        return os.splice(pipe, self._fd, end - offset, offset_dst=offset, flags=flags)

    def _write_whole(self, parts: list[bytes], size: int) -> None:
        """Append one record, or nothing: a short write (a disk that fills up) is cut off
        again and raised as ENOSPC, so the journal only ever holds whole records."""
        start = self._segments[-1].size
        written = os.pwritev(self._fd, parts, start)
        if written != size:
            os.ftruncate(self._fd, start)
            raise OSError(errno.ENOSPC, "the journal's disk is full")

    def _account(self, size: int, seq: int, output_bytes: int, rotate: bool = True) -> None:
        segment = self._segments[-1]
        segment.size += size
        segment.last_seq = seq
        segment.output_bytes += output_bytes
        self.total_bytes += size
        if rotate and segment.size >= self.segment_bytes:
            self._rotate()

    def _rotate(self) -> None:
        os.close(self._fd)
        self._open_segment(self.next_seq)
        self._drop_middle()

    def _drop_middle(self) -> None:
        while self.total_bytes > self.max_bytes:
            victim = next((s for s in self._segments[:-1] if not s.head), None)
            if victim is None:
                return
            self._segments.remove(victim)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(victim.path)
            self.total_bytes -= victim.size
            record = TRUNCATION.pack(victim.first_seq, victim.last_seq, victim.output_bytes)
            with open(os.path.join(self._dir, TRUNCATIONS_FILE), "ab") as out:
                out.write(record)

    def write_exit(self, event: pb.Event) -> int:
        """Append the final Exited event and store it in the reserved exit record.

        The exit record is written even when the journal append fails for lack of space,
        so a run's status is never lost to a full disk. Nothing follows it: no segment is
        opened or dropped after it, so the journal a reader that has seen the exit measures
        is the journal for good (the daemon sizes a finished run once, then).
        """
        seq = self.next_seq
        event.seq = seq
        event.time_unix_ns = event.time_unix_ns or time.time_ns()
        with contextlib.suppress(OSError):
            self._append(event, rotate=False)
        record = encode_record(seq, event.SerializeToString())
        os.pwrite(self._exit_fd, record, 0)
        return seq

    def close(self) -> None:
        for fd in (self._fd, self._exit_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.fsync(fd)
                os.close(fd)
        self._fd = self._exit_fd = -1
