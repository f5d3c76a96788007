"""The journal on its own: records, bounding with head and tail kept, readers, exit record,
spliced output, torn tails."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from journal_writer import JournalWriter

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner.journal import (
    HEADER,
    LENGTH_BITS,
    MAX_RECORD_BYTES,
    JournalReader,
    list_segments,
    parse_event,
    read_exit_record,
    write_lost_exit,
)

F_SETPIPE_SZ = 1031
PIPE_BYTES = 1024 * 1024  # as large as the keeper makes its output pipes
STDOUT = pb.STREAM_STDOUT
STDERR = pb.STREAM_STDERR


def output(data: bytes) -> pb.Event:
    event = pb.Event()
    event.output.stream = pb.STREAM_STDOUT
    event.output.data = data
    return event


def exited(code: int) -> pb.Event:
    event = pb.Event()
    event.exited.code = code
    event.exited.reason = pb.EXIT_REASON_EXITED
    return event


def read_all(directory: Path, after: int = 0, verify: bool = True) -> list[pb.Event]:
    reader = JournalReader(directory, after)
    events: list[pb.Event] = []
    try:
        while batch := reader.read(1 << 20, verify=verify):
            events.extend(parse_event(payload) for _seq, payload in batch)
    finally:
        reader.close()
    return events


def test_records_come_back_in_order_with_consecutive_seqs(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, max_bytes=1 << 20)
    for i in range(100):
        writer.append(output(f"line {i}\n".encode()))
    writer.write_exit(exited(0))
    writer.close()
    events = read_all(tmp_path)
    assert [e.seq for e in events] == list(range(1, 102))
    assert b"".join(e.output.data for e in events[:-1]) == b"".join(
        f"line {i}\n".encode() for i in range(100)
    )
    assert events[-1].exited.code == 0


def test_reader_resumes_after_a_seq(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    for i in range(300):
        writer.append(output(b"%05d" % i))
    writer.close()
    assert len(list_segments(tmp_path)) > 1
    events = read_all(tmp_path, after=123)
    assert [e.seq for e in events] == list(range(124, 301))


def test_reader_skips_many_large_records_to_reach_its_seq(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, max_bytes=512 << 20)
    for i in range(40):
        writer.append(output(bytes([i]) * 600_000))
    writer.close()
    reader = JournalReader(tmp_path, after_seq=30)
    batch = reader.read(2 << 20)
    reader.close()
    assert [seq for seq, _payload in batch][:1] == [31]


def test_bounded_journal_keeps_head_and_tail_and_says_what_went(tmp_path: Path) -> None:
    limit = 256 * 1024
    writer = JournalWriter(tmp_path, max_bytes=limit, segment_bytes=16 * 1024)
    chunk = 1000
    total = 0
    for i in range(2000):
        writer.append(output(bytes([i % 251]) * chunk))
        total += chunk
    writer.write_exit(exited(0))
    writer.close()
    on_disk = sum(p.stat().st_size for _first, p in list_segments(tmp_path))
    assert on_disk <= limit + 2 * 16 * 1024

    events = read_all(tmp_path)
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds[0] == "output"
    assert kinds[-1] == "exited"
    truncations = [e for e in events if e.HasField("truncated")]
    assert truncations, "the dropped middle must be announced"
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    delivered = sum(len(e.output.data) for e in events)
    dropped = sum(e.truncated.bytes for e in truncations)
    assert delivered + dropped == total
    for t in truncations:
        assert t.seq == t.truncated.last_seq
        assert t.truncated.first_seq <= t.truncated.last_seq


def test_reader_inside_a_dropped_segment_sees_it_whole(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, max_bytes=256 * 1024, segment_bytes=16 * 1024)
    for _ in range(200):  # past the head budget, into the tail
        writer.append(output(b"a" * 1000))
    reader = JournalReader(tmp_path, after_seq=170)
    first = reader.read(1000)
    assert first
    for _ in range(2000):  # drops the segment the reader is in
        writer.append(output(b"b" * 1000))
    rest = []
    while batch := reader.read(1 << 20):
        rest.extend(batch)
    reader.close()
    seqs = [seq for seq, _payload in first + rest]
    assert seqs[0] == 171
    assert seqs == sorted(seqs)
    assert len(seqs) == len(set(seqs))


def test_exit_record_is_readable_without_the_journal(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, max_bytes=1 << 20)
    assert read_exit_record(tmp_path) is None
    writer.append(output(b"x"))
    writer.write_exit(exited(3))
    writer.close()
    record = read_exit_record(tmp_path)
    assert record is not None
    assert record.exited.code == 3
    assert record.seq == 2


def test_partial_record_at_the_tail_is_not_read(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, max_bytes=1 << 20)
    writer.append(output(b"whole"))
    writer.close()
    segment = list_segments(tmp_path)[-1][1]
    with open(segment, "ab") as out:
        out.write(b"\x10\x00\x00\x00partial")
    events = read_all(tmp_path)
    assert [e.output.data for e in events] == [b"whole"]


def test_lost_exit_is_recorded(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, max_bytes=1 << 20)
    writer.append(output(b"before"))
    writer.close()
    os.unlink(tmp_path / "exit.rec")
    write_lost_exit(tmp_path, 2, "keeper died")
    events = read_all(tmp_path)
    assert events[-1].exited.reason == pb.EXIT_REASON_LOST
    record = read_exit_record(tmp_path)
    assert record is not None
    assert record.exited.message == "keeper died"


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A real pipe, as large as the keeper makes its output pipes."""
    r, w = os.pipe()
    fcntl.fcntl(r, F_SETPIPE_SZ, PIPE_BYTES)
    os.set_blocking(r, False)
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


def headers(directory: Path) -> list[tuple[int, int, int]]:
    """(length, P, seq) of every record in the journal's segments, walked on disk."""
    found = []
    for _first, path in list_segments(directory):
        data = path.read_bytes()
        offset = 0
        while offset + HEADER.size <= len(data):
            word, _crc, seq = HEADER.unpack_from(data, offset)
            length = word & MAX_RECORD_BYTES
            found.append((length, word >> LENGTH_BITS, seq))
            offset += HEADER.size + length
    return found


def splice(writer: JournalWriter, pipe: tuple[int, int], data: bytes, stream: int = STDOUT) -> int:
    os.write(pipe[1], data)
    return writer.splice_output(stream, pipe[0], len(data))


@pytest.mark.parametrize("verify", [True, False])
def test_spliced_and_read_output_come_back_byte_exact(
    tmp_path: Path, pipe: tuple[int, int], verify: bool
) -> None:
    rng = random.Random(7)
    chunks = [rng.randbytes(n) for n in (1, 62, 63, 64, 1000, 65536, 1 << 20)]
    chunks.append(b"\x00" * 5000)
    writer = JournalWriter(tmp_path, max_bytes=64 << 20, segment_bytes=256 * 1024)
    writer.append(pb.Event(started=pb.Started(pid=1)))
    for i, chunk in enumerate(chunks):
        if i % 2:
            writer.append_output(STDERR, chunk)
        else:
            splice(writer, pipe, chunk, STDERR)
    writer.write_exit(exited(0))
    writer.close()
    events = read_all(tmp_path, verify=verify)
    assert [e.seq for e in events] == list(range(1, len(chunks) + 3))
    outputs = [e.output for e in events if e.HasField("output")]
    assert [o.data for o in outputs] == chunks
    assert {o.stream for o in outputs} == {STDERR}
    assert events[-1].exited.code == 0
    assert len(list_segments(tmp_path)) > 1


def test_output_checksums_cover_the_prefix_and_the_rest_cover_everything(
    tmp_path: Path, pipe: tuple[int, int]
) -> None:
    writer = JournalWriter(tmp_path, max_bytes=1 << 20)
    writer.append(pb.Event(started=pb.Started(pid=1)))
    writer.append_output(STDOUT, b"r" * 1000)
    splice(writer, pipe, b"s" * 1000)
    writer.close()
    (_, started_p, _), (read_len, read_p, _), (spliced_len, spliced_p, _) = headers(tmp_path)
    assert started_p == 0  # all of it
    assert read_p == 63  # the prefix and the first data bytes the keeper had in hand
    prefix = spliced_len - 1000
    assert spliced_p == prefix  # the prefix alone: the data never was in the keeper
    assert read_len == spliced_len


def damage(directory: Path, record: int, offset_in_payload: int) -> None:
    """Flip one byte of a record's payload on disk."""
    path = list_segments(directory)[-1][1]
    data = bytearray(path.read_bytes())
    pos = 0
    for _ in range(record):
        pos += HEADER.size + (HEADER.unpack_from(data, pos)[0] & MAX_RECORD_BYTES)
    data[pos + HEADER.size + offset_in_payload] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verifying_reader_stops_at_a_damaged_prefix(tmp_path: Path, pipe: tuple[int, int]) -> None:
    writer = JournalWriter(tmp_path, max_bytes=1 << 20)
    splice(writer, pipe, b"first")
    splice(writer, pipe, b"second")
    writer.close()
    damage(tmp_path, record=1, offset_in_payload=3)
    assert [e.output.data for e in read_all(tmp_path)] == [b"first"]
    reader = JournalReader(tmp_path, 0)
    assert [seq for seq, _payload in reader.read(1 << 20, verify=False)] == [1, 2]
    reader.close()


def test_full_checksums_still_cover_every_byte(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, max_bytes=1 << 20)
    writer.append(output(b"a" * 500))  # encoded by protobuf: P = 0, the older format
    writer.append(output(b"b" * 500))
    writer.close()
    assert [p for _length, p, _seq in headers(tmp_path)] == [0, 0]
    damage(tmp_path, record=1, offset_in_payload=400)
    assert [e.output.data for e in read_all(tmp_path)] == [b"a" * 500]


def test_a_short_splice_is_cut_back_and_reported_as_a_full_disk(
    tmp_path: Path, pipe: tuple[int, int]
) -> None:
    writer = JournalWriter(tmp_path, max_bytes=1 << 20)
    splice(writer, pipe, b"before")
    os.write(pipe[1], b"only 12 byte")
    os.close(pipe[1])  # the pipe ends before the 1000 bytes the record was sized for
    with pytest.raises(OSError, match="disk is full") as raised:
        writer.splice_output(STDOUT, pipe[0], 1000)
    assert raised.value.errno == errno.ENOSPC
    writer.append_output(STDOUT, b"after")
    writer.close()
    for verify in (True, False):
        events = read_all(tmp_path, verify=verify)
        assert [(e.seq, e.output.data) for e in events] == [(1, b"before"), (2, b"after")]


def test_a_source_that_cannot_be_spliced_takes_nothing(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, max_bytes=1 << 20)
    writer.append_output(STDOUT, b"before")
    source = tmp_path / "not-a-pipe"
    source.write_bytes(b"x" * 100)
    fd = os.open(source, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="Invalid argument") as raised:
            writer.splice_output(STDOUT, fd, 100)
        assert raised.value.errno == errno.EINVAL
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
    finally:
        os.close(fd)
    writer.append_output(STDOUT, b"after")
    writer.close()
    events = read_all(tmp_path)
    assert [(e.seq, e.output.data) for e in events] == [(1, b"before"), (2, b"after")]


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("cut", ["in-header", "header-only", "in-prefix", "half-payload"])
@pytest.mark.parametrize("spliced", [True, False], ids=["spliced", "read"])
def test_lost_exit_cuts_a_torn_tail_first(
    tmp_path: Path, pipe: tuple[int, int], verify: bool, cut: str, spliced: bool
) -> None:
    writer = JournalWriter(tmp_path, max_bytes=1 << 20)
    writer.append(pb.Event(started=pb.Started(pid=1)))
    writer.append_output(STDOUT, b"whole one")
    splice(writer, pipe, b"whole \x00 two")
    whole = os.path.getsize(list_segments(tmp_path)[-1][1])
    if spliced:  # the record a keeper was writing when it died
        splice(writer, pipe, b"t" * 4000)
    else:
        writer.append_output(STDOUT, b"t" * 4000)
    writer.close()
    os.unlink(tmp_path / "exit.rec")
    torn_at = {"in-header": 7, "header-only": 16, "in-prefix": 20, "half-payload": 2000}[cut]
    os.truncate(list_segments(tmp_path)[-1][1], whole + torn_at)

    write_lost_exit(tmp_path, 4, "keeper died")

    events = read_all(tmp_path, verify=verify)
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert [e.output.data for e in events[1:3]] == [b"whole one", b"whole \x00 two"]
    assert events[3].exited.reason == pb.EXIT_REASON_LOST
    assert read_all(tmp_path, after=2, verify=verify)[-1].seq == 4


def test_lost_exit_keeps_a_journal_of_whole_records_whole(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, max_bytes=1 << 20)
    writer.append_output(STDOUT, b"")
    writer.append_output(STDOUT, b"last")
    writer.close()
    write_lost_exit(tmp_path, 3, "keeper died")
    events = read_all(tmp_path)
    assert [(e.seq, e.output.data) for e in events[:2]] == [(1, b""), (2, b"last")]
    assert events[2].exited.reason == pb.EXIT_REASON_LOST
