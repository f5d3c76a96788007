"""A run's durable, bounded event journal.

Layout of a journal directory::

    seg-00000000000000000001.log   records with seq >= 1
    seg-00000000000000000412.log   records with seq >= 412
    truncations.bin                 (first_seq, last_seq, bytes) of every dropped range
    exit.rec                        the Exited record, in space reserved when the run began

A record is ``u32 length | u32 crc32(payload) | u64 seq | payload`` where the payload is a
serialized ``forgehand.runner.v1.Event``. One process (the run's supervisor) writes; any
number of readers follow. A segment is final once a later one exists, so a reader that
reached the end of a segment and sees a successor re-reads the tail once, then moves on.

Bounding: the writer starts a new segment every ``segment_bytes``. When the journal exceeds
``max_bytes``, whole segments from the middle are deleted (the head segments written while
the journal was under half the limit are kept, as is the newest tail) and the dropped range
is appended to ``truncations.bin``. A reader that crosses a gap yields one synthetic
``Truncated`` event whose seq is the last dropped seq, so the client's cursor moves on and
nothing is delivered twice. A reader already inside a segment keeps its open file and sees
it whole even if the writer deletes it.

Durability (the fsync policy): records are written with one ``write`` each and are not
fsynced one by one; the page cache survives a crash of the daemon or of the keeper, which
is what the protocol promises. The writer fsyncs the exit record and the last segment when
the run has ended, after the daemon has been told (so fsync latency is not on the path of
a short command); rotated segments are not fsynced. A power loss can lose
the last moments of output and, within milliseconds of the end, the exit status; a
sandbox does not survive a power loss anyway.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from forgehand._proto.runner.v1 import runner_pb2 as pb

HEADER = struct.Struct("<IIQ")
TRUNCATION = struct.Struct("<QQQ")
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".log"
EXIT_FILE = "exit.rec"
TRUNCATIONS_FILE = "truncations.bin"
EXIT_RESERVE_BYTES = 4096
MAX_RECORD_BYTES = 64 * 1024 * 1024
MAX_SEGMENT_BYTES = 4 * 1024 * 1024
MIN_READ_BYTES = 64 * 1024


class JournalCorrupt(Exception):
    """A record failed its length or checksum test at a place where it should be whole."""


def segment_name(first_seq: int) -> str:
    return f"{SEGMENT_PREFIX}{first_seq:020d}{SEGMENT_SUFFIX}"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """The journal's segments as (first_seq, path), oldest first."""
    found = []
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX):
                digits = name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)]
                if digits.isdigit():
                    found.append((int(digits), Path(entry.path)))
    found.sort()
    return found


def encode_record(seq: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), zlib.crc32(payload), seq) + payload


def journal_bytes(directory: Path) -> int:
    """Bytes the journal directory takes on disk (its files' sizes)."""
    total = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat(follow_symlinks=False).st_size
    return total


@dataclass
class _Segment:
    first_seq: int
    path: Path
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

    def __post_init__(self) -> None:
        if self.segment_bytes <= 0:
            # Small enough that a resumed reader finds its place quickly, large enough that
            # the middle is dropped in useful pieces.
            self.segment_bytes = min(MAX_SEGMENT_BYTES, max(64 * 1024, self.max_bytes // 16))
        self.directory.mkdir(parents=True, exist_ok=True)
        self._reserve_exit_record()
        self._open_segment(self.next_seq)

    def _reserve_exit_record(self) -> None:
        path = self.directory / EXIT_FILE
        self._exit_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.posix_fallocate(self._exit_fd, 0, EXIT_RESERVE_BYTES)

    def _open_segment(self, first_seq: int) -> None:
        path = self.directory / segment_name(first_seq)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o600)
        head = self.total_bytes < self.max_bytes // 2
        self._segments.append(_Segment(first_seq, path, head=head))

    def append(self, event: pb.Event) -> int:
        """Assign the next seq and time to the event, append it, return the seq.

        Raises OSError (ENOSPC and the like) when the disk refuses the write.
        """
        seq = self.next_seq
        event.seq = seq
        if not event.time_unix_ns:
            event.time_unix_ns = time.time_ns()
        record = encode_record(seq, event.SerializeToString())
        os.write(self._fd, record)
        self.next_seq = seq + 1
        self._account(len(record), seq, event)
        return seq

    def _account(self, size: int, seq: int, event: pb.Event) -> None:
        segment = self._segments[-1]
        segment.size += size
        segment.last_seq = seq
        if event.HasField("output"):
            segment.output_bytes += len(event.output.data)
        self.total_bytes += size
        if segment.size >= self.segment_bytes:
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
                victim.path.unlink()
            self.total_bytes -= victim.size
            record = TRUNCATION.pack(victim.first_seq, victim.last_seq, victim.output_bytes)
            with open(self.directory / TRUNCATIONS_FILE, "ab") as out:
                out.write(record)

    def write_exit(self, event: pb.Event) -> int:
        """Append the final Exited event and store it in the reserved exit record.

        The exit record is written even when the journal append fails for lack of space,
        so a run's status is never lost to a full disk.
        """
        seq = self.next_seq
        event.seq = seq
        event.time_unix_ns = event.time_unix_ns or time.time_ns()
        with contextlib.suppress(OSError):
            self.append(event)
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


def read_exit_record(directory: Path) -> pb.Event | None:
    """The run's Exited event from the reserved exit record, or None if it has not ended."""
    try:
        data = (directory / EXIT_FILE).read_bytes()
    except FileNotFoundError:
        return None
    parsed = _parse_record(data, 0)
    if parsed is None:
        return None
    _seq, payload, _end = parsed
    event = pb.Event.FromString(payload)
    return event if event.HasField("exited") else None


def write_lost_exit(directory: Path, seq: int, message: str) -> pb.Event:
    """Record that a run's supervisor vanished without writing an exit status."""
    event = pb.Event(seq=seq, time_unix_ns=time.time_ns())
    event.exited.code = -1
    event.exited.reason = pb.EXIT_REASON_LOST
    event.exited.message = message
    record = encode_record(seq, event.SerializeToString())
    segments = list_segments(directory)
    target = segments[-1][1] if segments else directory / segment_name(seq)
    with contextlib.suppress(OSError), open(target, "ab") as out:
        out.write(record)
    fd = os.open(directory / EXIT_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, record, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return event


def _parse_record(data: bytes | memoryview, pos: int) -> tuple[int, bytes, int] | None:
    """Parse one record at pos: (seq, payload, end) or None if it is not whole yet."""
    if len(data) - pos < HEADER.size:
        return None
    length, crc, seq = HEADER.unpack_from(data, pos)
    if length == 0 and crc == 0 and seq == 0:
        return None
    start = pos + HEADER.size
    end = start + length
    if length > MAX_RECORD_BYTES or end > len(data):
        return None
    payload = bytes(data[start:end])
    if zlib.crc32(payload) != crc:
        return None
    return seq, payload, end


def read_truncations(directory: Path) -> list[tuple[int, int, int]]:
    try:
        data = (directory / TRUNCATIONS_FILE).read_bytes()
    except FileNotFoundError:
        return []
    usable = len(data) - len(data) % TRUNCATION.size
    return [TRUNCATION.unpack_from(data, off) for off in range(0, usable, TRUNCATION.size)]


def dropped_bytes(directory: Path, first_seq: int, last_seq: int) -> int:
    return sum(
        size for lo, hi, size in read_truncations(directory) if lo >= first_seq and hi <= last_seq
    )


class JournalReader:
    """Follows one journal from a seq onwards. Not shared between tasks.

    ``read`` returns the whole records available now, as (seq, serialized Event) pairs,
    up to about ``max_bytes``; an empty list means nothing new yet.
    """

    READ_CHUNK = 1024 * 1024

    def __init__(self, directory: Path, after_seq: int) -> None:
        self.directory = directory
        self.last_seq = after_seq
        self._file: int = -1
        self._segment_first = 0
        self._buffer = bytearray()
        self._offset = 0

    def close(self) -> None:
        if self._file >= 0:
            os.close(self._file)
            self._file = -1

    def read(self, max_bytes: int) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        budget = max_bytes
        while budget > 0:
            if self._file < 0 and not self._open_next(out):
                break
            got, progressed = self._read_current(budget)
            if got:
                out.extend(got)
                budget -= sum(len(p) for _, p in got)
            elif not progressed and not self._advance_if_final(out):
                break  # at the end of what has been written so far
        return out

    def _read_current(self, budget: int) -> tuple[list[tuple[int, bytes]], bool]:
        """Records newer than last_seq from the next chunk, and whether any bytes were read."""
        size = min(max(MIN_READ_BYTES, budget), 16 * self.READ_CHUNK)
        chunk = os.pread(self._file, size, self._offset)
        if chunk:
            self._buffer += chunk
            self._offset += len(chunk)
        return self._parse_buffer(), bool(chunk)

    def _drain(self) -> list[tuple[int, bytes]]:
        records: list[tuple[int, bytes]] = []
        while chunk := os.pread(self._file, 16 * self.READ_CHUNK, self._offset):
            self._buffer += chunk
            self._offset += len(chunk)
            records.extend(self._parse_buffer())
        return records

    def _parse_buffer(self) -> list[tuple[int, bytes]]:
        records: list[tuple[int, bytes]] = []
        pos = 0
        view = memoryview(self._buffer)
        try:
            while True:
                parsed = _parse_record(view, pos)
                if parsed is None:
                    break
                seq, payload, pos = parsed
                if seq > self.last_seq:
                    records.append((seq, payload))
                    self.last_seq = seq
        finally:
            view.release()
        del self._buffer[:pos]
        return records

    def _open_next(self, out: list[tuple[int, bytes]]) -> bool:
        segments = list_segments(self.directory)
        wanted = self.last_seq + 1
        chosen = None
        for first, path in segments:
            if first <= wanted or (chosen is None and first > wanted):
                chosen = (first, path)
            if first > wanted:
                break
        if chosen is None:
            return False
        first, path = chosen
        if first > wanted:
            self._emit_gap(out, wanted, first - 1)
        return self._open(first, path)

    def _open(self, first: int, path: Path) -> bool:
        try:
            self._file = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        self._segment_first = first
        self._buffer.clear()
        self._offset = self._skip_to_cursor() if first <= self.last_seq else 0
        return True

    def _skip_to_cursor(self) -> int:
        """The offset of the first record after last_seq, found by walking record headers
        (a resume does not read the payloads it has already delivered)."""
        offset = 0
        while True:
            header = os.pread(self._file, HEADER.size, offset)
            if len(header) < HEADER.size:
                return offset
            length, _crc, seq = HEADER.unpack(header)
            if seq > self.last_seq or length > MAX_RECORD_BYTES or (length, seq) == (0, 0):
                return offset
            offset += HEADER.size + length

    def _advance_if_final(self, out: list[tuple[int, bytes]]) -> bool:
        """At the end of the current segment: move to its successor if one exists."""
        successors = [s for s in list_segments(self.directory) if s[0] > self._segment_first]
        if not successors:
            return False
        out.extend(self._drain())
        self.close()
        first, path = successors[0]
        if first > self.last_seq + 1:
            self._emit_gap(out, self.last_seq + 1, first - 1)
        return self._open(first, path)

    def _emit_gap(self, out: list[tuple[int, bytes]], first: int, last: int) -> None:
        event = pb.Event(seq=last, time_unix_ns=time.time_ns())
        event.truncated.first_seq = first
        event.truncated.last_seq = last
        event.truncated.bytes = dropped_bytes(self.directory, first, last)
        out.append((last, event.SerializeToString()))
        self.last_seq = last
