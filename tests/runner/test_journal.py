"""The journal on its own: records, bounding with head and tail kept, readers, exit record."""

from __future__ import annotations

import os
from pathlib import Path

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner.journal import (
    JournalReader,
    JournalWriter,
    list_segments,
    read_exit_record,
    write_lost_exit,
)


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


def read_all(directory: Path, after: int = 0) -> list[pb.Event]:
    reader = JournalReader(directory, after)
    events: list[pb.Event] = []
    try:
        while batch := reader.read(1 << 20):
            events.extend(pb.Event.FromString(payload) for _seq, payload in batch)
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
