"""Hand-assembled wire bytes of the attach responses, shared by gRPC and the direct channel.

Attach responses are assembled from the journal's already-serialized events (the wire
encoding of a repeated message field is its elements' bytes, each behind a tag and a
length), so output bytes are never parsed and re-encoded on their way out. The ``*_parts``
functions return the pieces in order, for a writer that gathers them (``sendmsg``); the
``encode_*`` ones join them, for gRPC, which takes one ``bytes`` per message.
"""

from __future__ import annotations

from forgehand.runner import errors
from forgehand.runner.core import AttachBatch
from forgehand.runner.journal import Payload, varint


def attach_parts(batch: AttachBatch) -> list[Payload]:
    """An AttachResponse holding the batch, in pieces."""
    parts: list[Payload] = []
    for event in batch.events:
        parts += (b"\x0a" + varint(len(event)), event)
    if batch.handback:
        parts.append(b"\x10\x01")
    if batch.ended:
        parts.append(b"\x18\x01")
    return parts


def encode_attach(batch: AttachBatch) -> bytes:
    """The wire bytes of an AttachResponse holding the batch."""
    return b"".join(attach_parts(batch))


def session_parts(tag: int, batch: AttachBatch) -> list[Payload]:
    """A SessionResponse carrying the batch (done with the final one), in pieces."""
    parts = attach_parts(batch)
    size = sum(len(part) for part in parts)
    done: list[Payload] = [b"\x18\x01"] if batch.final else []
    return [b"\x08" + varint(tag) + b"\x12" + varint(size), *parts, *done]


def encode_session(tag: int, batch: AttachBatch) -> bytes:
    """The wire bytes of a SessionResponse carrying the batch (done with the final one)."""
    return b"".join(session_parts(tag, batch))


def session_error_parts(tag: int, error: errors.RunnerError) -> list[Payload]:
    """The SessionResponse that ends the attach under tag with an error, in pieces."""
    code: int = error.code.value[0]
    message = str(error).encode()
    return [
        b"\x08" + varint(tag) + b"\x18\x01\x20" + varint(code) + b"\x2a" + varint(len(message)),
        message,
    ]


def encode_session_error(tag: int, error: errors.RunnerError) -> bytes:
    """The wire bytes of the SessionResponse that ends the attach under tag with an error."""
    return b"".join(session_error_parts(tag, error))
