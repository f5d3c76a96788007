"""The step engine's events as the runner's keeper takes them on fd 3.

Each event is one frame, ``u32 little-endian length | serialized StepEvent`` (the message
of ``forgehand/_proto/runner/v1/runner.proto``). The keeper, a small compiled program,
checks each frame against that message and stores it in the run's journal as it is, so
it never parses JSON. The message is encoded by hand here: the engine starts once per
step run, and importing protobuf's runtime would add 40 ms to every start.
"""

from __future__ import annotations

import json
import struct
from typing import Any

FRAME = struct.Struct("<I")
KINDS = {"step_started": 1, "step_finished": 2, "result": 3}
"""The ``type`` of an engine event → StepEvent.Kind."""
RESULT = 3
INT32 = range(-(1 << 31), 1 << 31)


def encode_step_event(event: dict[str, Any]) -> bytes | None:
    """The frame of one engine event (a dict with ``type``), or None for an unknown type."""
    kind = KINDS.get(event.get("type"))  # type: ignore[arg-type]
    if kind is None:
        return None
    fields = [_varint_field(1, kind)]
    if kind == RESULT:
        fields.append(_text_field(7, json.dumps(event.get("result"))))
    else:
        fields += [_text_field(2, str(part)) for part in event.get("path") or ()]
        fields.append(_text_field(3, str(event.get("status") or "")))
        if event.get("outputs") is not None:
            fields.append(_text_field(4, json.dumps(event["outputs"])))
        exit_code = event.get("exit_code")
        if isinstance(exit_code, int) and not isinstance(exit_code, bool) and exit_code in INT32:
            fields.append(_varint_field(5, exit_code))
        fields.append(_text_field(6, str(event.get("error") or "")))
    body = b"".join(fields)
    return FRAME.pack(len(body)) + body


def _varint(value: int) -> bytes:
    """``forgehand.runner.journal.varint``'s twin, which the engine cannot import: the
    journal module loads protobuf."""
    value &= (1 << 64) - 1  # a negative int32 is sign-extended to ten bytes, as protobuf does
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value) if value else b""


def _text_field(number: int, text: str) -> bytes:
    """A string field; proto3 leaves an empty one out. Unpaired surrogates (which no
    UTF-8 holds) become '?'."""
    data = text.encode("utf-8", "replace")
    return _varint(number << 3 | 2) + _varint(len(data)) + data if data else b""
