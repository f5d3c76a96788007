"""A run's durable, bounded event journal.

Layout of a journal directory::

    seg-00000000000000000001.log   records with seq >= 1
    seg-00000000000000000412.log   records with seq >= 412
    truncations.bin                 (first_seq, last_seq, bytes) of every dropped range
    exit.rec                        the Exited record, in space reserved when the run began

A record is ``u32 word | u32 crc32 | u64 seq | payload`` where the payload is a serialized
``forgehand.runner.v1.Event``. The word holds the payload's length in its low 26 bits and,
in its top 6 bits, P: how much of the payload the checksum covers.

- P = 0 (every record but output; all records of older journals): the crc covers the whole
  payload.
- P > 0 (output records): the crc covers the header's word and seq and then the payload's
  first P bytes: the Event's hand-encoded prefix (seq, time, stream, lengths), plus the
  first data bytes where the keeper had them in hand. Output is the bulk of a journal and
  checksumming every byte of it cost a fifth of the keeper's CPU; a pipe's output is moved
  into the journal with ``splice`` and never reaches the keeper's memory at all.

One process (the keeper) writes; any number of readers follow. A segment is final once a
later one exists, so a reader that reached the end of a segment and sees a successor
re-reads the tail once, then moves on. The writer appends whole records only (a short
write is cut off again), and a record is whole once the bytes its header announces are in
the file: readers check checksums only where a crash may have left damage (see
``JournalReader.read``). A keeper that dies mid-record leaves a torn tail;
``write_lost_exit`` cuts it off before it appends the lost exit, so no reader has to tell
a torn record from the next one by its checksum (which, for output, does not cover the
data).

Bounding: the writer starts a new segment every ``segment_bytes``. When the journal exceeds
``max_bytes``, whole segments from the middle are deleted (the head segments written while
the journal was under half the limit are kept, as is the newest tail) and the dropped range
is appended to ``truncations.bin``. A reader that crosses a gap yields one synthetic
``Truncated`` event whose seq is the last dropped seq, so the client's cursor moves on and
nothing is delivered twice. A reader already inside a segment keeps its open file and sees
it whole even if the writer deletes it.

Durability (the fsync policy): records are written with one ``pwritev`` (or a ``pwrite``
of header and prefix followed by a ``splice`` of the data) each and are not
fsynced one by one; the page cache survives a crash of the daemon or of the keeper, which
is what the protocol promises. The writer fsyncs the exit record and the last segment when
the run has ended, after the daemon has been told (so fsync latency is not on the path of
a short command); rotated segments are not fsynced. A power loss can lose
the last moments of output and, within milliseconds of the end, the exit status; a
sandbox does not survive a power loss anyway.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import time
import zlib
from pathlib import Path

from forgehand._proto.runner.v1 import runner_pb2 as pb

HEADER = struct.Struct("<IIQ")  # word (length | P << LENGTH_BITS), crc32, seq
WORD_SEQ = struct.Struct("<IQ")  # what a P > 0 checksum covers of the header
TRUNCATION = struct.Struct("<QQQ")
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".log"
EXIT_FILE = "exit.rec"
TRUNCATIONS_FILE = "truncations.bin"
LENGTH_BITS = 26
MAX_RECORD_BYTES = (1 << LENGTH_BITS) - 1  # 64 MiB; the top 6 bits of the word hold P
MIN_READ_BYTES = 64 * 1024
SMALL_READ_BYTES = 256 * 1024  # a read of many small records; a large one is read alone

Payload = bytes | memoryview  # a record's serialized Event; a view into the bytes read


class JournalCorrupt(Exception):
    """A record failed its length or checksum test at a place where it should be whole."""


def segment_name(first_seq: int) -> str:
    return f"{SEGMENT_PREFIX}{first_seq:020d}{SEGMENT_SUFFIX}"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """The journal's segments as (first_seq, path), oldest first."""
    return [(first, Path(path)) for first, path in _segments(directory)]


def _segments(directory: Path | str) -> list[tuple[int, str]]:
    """``list_segments`` with plain string paths (readers call it on their hot path)."""
    found = []
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX):
                digits = name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)]
                if digits.isdigit():
                    found.append((int(digits), entry.path))
    found.sort()
    return found


def varint(value: int) -> bytes:
    """``value`` as a protobuf varint (records and responses are assembled by hand)."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_record(seq: int, payload: bytes) -> bytes:
    """A record whose checksum covers its whole payload (P = 0)."""
    _check_length(len(payload))
    return HEADER.pack(len(payload), zlib.crc32(payload), seq) + payload


def _check_length(length: int) -> None:
    if length > MAX_RECORD_BYTES:
        raise OSError(errno.EFBIG, f"a journal record holds at most {MAX_RECORD_BYTES} bytes")


def _checksum(word: int, seq: int, payload: Payload) -> int:
    """The crc32 a record with this header word, seq and payload must carry."""
    covered = word >> LENGTH_BITS
    if not covered:
        return zlib.crc32(payload)
    return zlib.crc32(payload[:covered], zlib.crc32(WORD_SEQ.pack(word, seq)))


def journal_bytes(directory: Path) -> int:
    """Bytes the journal directory takes on disk (its files' sizes)."""
    total = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat(follow_symlinks=False).st_size
    return total


def read_exit_record(directory: Path) -> pb.Event | None:
    """The run's Exited event from the reserved exit record, or None if it has not ended."""
    try:
        with open(os.path.join(directory, EXIT_FILE), "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return None
    parsed = _parse_record(data, 0)
    if parsed is None:
        return None
    _seq, payload, _end = parsed
    event = parse_event(payload)
    return event if event.HasField("exited") else None


def write_lost_exit(directory: Path, seq: int, message: str) -> pb.Event:
    """Record that a run's supervisor vanished without writing an exit status."""
    event = pb.Event(seq=seq, time_unix_ns=time.time_ns())
    event.exited.code = -1
    event.exited.reason = pb.EXIT_REASON_LOST
    event.exited.message = message
    record = encode_record(seq, event.SerializeToString())
    directory.mkdir(parents=True, exist_ok=True)  # the keeper may have died before making it
    segments = list_segments(directory)
    target = segments[-1][1] if segments else directory / segment_name(seq)
    with contextlib.suppress(OSError):
        _append_after_whole_records(target, record)
    fd = os.open(directory / EXIT_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, record, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return event


def _append_after_whole_records(path: Path, record: bytes) -> None:
    """Append a record to a segment, after cutting off a torn tail: what a keeper that died
    in the middle of a record left. Readers then need no checksum to find the record."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        end = _whole_records_end(os.pread(fd, os.fstat(fd).st_size, 0))
        os.ftruncate(fd, end)
        os.pwrite(fd, record, end)
    finally:
        os.close(fd)


def _whole_records_end(data: bytes) -> int:
    """The end of the last whole record (header and length within data) of a segment."""
    offset = 0
    while (size := _record_size(data, offset)) and offset + size <= len(data):
        offset += size
    return offset


def _parse_record(
    data: bytes | memoryview, pos: int, verify: bool = True
) -> tuple[int, Payload, int] | None:
    """Parse one record at pos: (seq, payload, end) or None if it is not whole yet (or,
    with verify, fails its checksum). The payload is a slice of data (a view, not a copy,
    when data is a memoryview)."""
    if len(data) - pos < HEADER.size:
        return None
    word, crc, seq = HEADER.unpack_from(data, pos)
    if word == 0 and crc == 0 and seq == 0:
        return None
    start = pos + HEADER.size
    end = start + (word & MAX_RECORD_BYTES)
    if end > len(data):
        return None
    payload = data[start:end]
    if verify and _checksum(word, seq, payload) != crc:
        return None
    return seq, payload, end


def parse_event(payload: Payload) -> pb.Event:
    """The Event a record holds (protobuf parses views as well as bytes)."""
    return pb.Event.FromString(payload)  # type: ignore[arg-type]


def _record_size(data: bytes, pos: int = 0) -> int:
    """The size of the record whose header is at pos (0 if there is no plausible header)."""
    if len(data) - pos < HEADER.size:
        return 0
    word, crc, seq = HEADER.unpack_from(data, pos)
    if (word, crc, seq) == (0, 0, 0):
        return 0
    return HEADER.size + int(word & MAX_RECORD_BYTES)


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
    up to about ``max_bytes``; an empty list means nothing new yet. Payloads are views
    into the bytes read (each read is a fresh object, so a view stays valid).

    Reads start at a record boundary: a large record is read alone, exactly (its header
    first), small ones many at a time; a record cut by the end of a read is read again
    whole next time, so no bytes are copied into a buffer and out again.
    """

    READ_CHUNK = 1024 * 1024

    def __init__(self, directory: Path, after_seq: int) -> None:
        self.directory = directory
        self._dir = os.fspath(directory)
        self.last_seq = after_seq
        self._file: int = -1
        self._segment_first = 0
        self._offset = 0
        self._verify = True

    def close(self) -> None:
        if self._file >= 0:
            os.close(self._file)
            self._file = -1

    def read(self, max_bytes: int, verify: bool = True) -> list[tuple[int, Payload]]:
        """See the class. ``verify=False`` skips the checksums: for a journal that a live
        keeper is writing, or wrote and finished, in this boot. Its records are whole once
        the bytes their header announces are in the file (written in order, read through
        the page cache), so a checksum cannot fail; it guards against damage a crash leaves
        (a power loss; a keeper's torn last record is cut off by ``write_lost_exit``)."""
        self._verify = verify
        out: list[tuple[int, Payload]] = []
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

    def _read_current(self, budget: int) -> tuple[list[tuple[int, Payload]], bool]:
        """Records newer than last_seq at the read offset, and whether the offset moved."""
        size = _record_size(os.pread(self._file, HEADER.size, self._offset))
        if size < MIN_READ_BYTES:
            size = max(MIN_READ_BYTES, min(budget, SMALL_READ_BYTES))
        chunk = memoryview(os.pread(self._file, size, self._offset))
        records: list[tuple[int, Payload]] = []
        pos = 0
        while (parsed := _parse_record(chunk, pos, self._verify)) is not None:
            seq, payload, pos = parsed
            if seq > self.last_seq:
                records.append((seq, payload))
                self.last_seq = seq
        self._offset += pos
        return records, pos > 0

    def _drain(self) -> list[tuple[int, Payload]]:
        records: list[tuple[int, Payload]] = []
        while True:
            got, progressed = self._read_current(16 * self.READ_CHUNK)
            records.extend(got)
            if not progressed:
                return records

    def _open_next(self, out: list[tuple[int, Payload]]) -> bool:
        wanted = self.last_seq + 1
        # A segment is named by its first seq: the one named so is the place to start.
        if self._open(wanted, os.path.join(self._dir, segment_name(wanted))):
            return True
        segments = _segments(self._dir)
        chosen: tuple[int, str] | None = None
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

    def _open(self, first: int, path: Path | str) -> bool:
        try:
            self._file = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        self._segment_first = first
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
            word, _crc, seq = HEADER.unpack(header)
            if seq > self.last_seq or (word, seq) == (0, 0):
                return offset
            offset += HEADER.size + (word & MAX_RECORD_BYTES)

    def _advance_if_final(self, out: list[tuple[int, Payload]]) -> bool:
        """At the end of the current segment: move to its successor if one exists."""
        successors = self._successors()
        if not successors:
            return False
        out.extend(self._drain())
        self.close()
        first, path = successors[0]
        if first > self.last_seq + 1:
            self._emit_gap(out, self.last_seq + 1, first - 1)
        return self._open(first, path)

    def _successors(self) -> list[tuple[int, str]]:
        """Segments after the current one. Looked up by name when nothing was dropped (the
        next segment starts right after the current one's last record): tailing a journal
        checks this at every pause, and listing a directory of many segments costs more."""
        path = os.path.join(self._dir, segment_name(self.last_seq + 1))
        if os.path.exists(path):
            return [(self.last_seq + 1, path)]
        if not self._dropped() and os.fstat(self._file).st_nlink:
            return []  # no gap can hide a later segment: this one is still being written
        return [s for s in _segments(self._dir) if s[0] > self._segment_first]

    def _dropped(self) -> bool:
        """Whether segments were dropped from the middle (then they are not contiguous)."""
        return os.path.exists(os.path.join(self._dir, TRUNCATIONS_FILE))

    def _emit_gap(self, out: list[tuple[int, Payload]], first: int, last: int) -> None:
        event = pb.Event(seq=last, time_unix_ns=time.time_ns())
        event.truncated.first_seq = first
        event.truncated.last_seq = last
        event.truncated.bytes = dropped_bytes(self.directory, first, last)
        out.append((last, event.SerializeToString()))
        self.last_seq = last
