"""The direct attach channel: a run's events on a plain unix socket, beside gRPC.

gRPC's Python stack copies every message several times on each side (into a byte buffer,
out of it, into protobuf) and hands each one between threads; for bulk output that costs
more CPU than the rest of the path. A client on the same host as the daemon (or on the
host of a sandbox whose socket directory it can reach) attaches here instead: one stream
socket per attach, the daemon writes journal records straight from its read buffer with
``sendmsg``, the client reads them into one buffer per message.

Wire format (all integers little-endian):

- The daemon listens on ``<grpc socket path>.direct`` (mode 0600, as the gRPC socket).
- On accepting a connection the daemon sends a *hello*: one frame holding an empty
  ``SessionResponse`` but for ``tag`` (``HELLO``). A daemon that does so lists
  ``direct-hello`` among its Capabilities features. Why: a listening socket can outlive
  its daemon. Under gVisor with ``--host-uds=create`` the gofer keeps its own copy of the
  socket it bound, so a connection made after the daemon died is accepted and never
  served; without the hello an attach of a quiet run could not tell it from a live one.
  A client that knows the feature, while its hello is late, checks every
  ``HELLO_CHECK_SECONDS`` that the socket file it dialled is still the one at the path
  (the keeper removes a dead daemon's at once, and the next daemon binds a new one). If
  it is not, the connection counts as cut and the client redials; if it is, the daemon is
  only slow, and the client waits on. Clients that do not look for the hello skip it like
  any frame without a response.
- The client sends one frame, ``u32 length | AttachRequest``, within
  ``REQUEST_SECONDS``; ``start`` may be set, exactly as on gRPC (idempotent).
- The daemon answers with frames ``u32 length | SessionResponse``: the ``response``
  field carries each batch, ``done`` marks the last frame, and an error ends the stream
  with ``error_code`` (a gRPC status code) and ``error_message``, as on a Session. The
  ``tag`` is always 1.
- The client ends an attach early by closing its socket; the run goes on. Sending
  anything after the request also ends it.

Semantics (sequence numbers, replay after ``after_seq``, ``wait_seconds``, hand-back,
errors) are the gRPC Attach's: both are served by ``RunnerCore.attach``. A client that
cannot reach this socket (no such file, a remote or exec-channel transport, an older
daemon) uses gRPC; nothing else depends on it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Sequence

from forgehand.runner.journal import Payload

FRAME = struct.Struct("<I")
TAG = 1
REQUEST_SECONDS = 10.0
HELLO_CHECK_SECONDS = 0.5
"""How often a client whose hello is late checks the socket it dialled (see above)."""
HELLO_FEATURE = "direct-hello"
HELLO = FRAME.pack(2) + b"\x08" + bytes([TAG])  # SessionResponse{tag: 1}
IOV_BATCH = 512  # buffers per sendmsg (IOV_MAX is 1024 on Linux)


async def send_parts(sock: socket.socket, parts: Sequence[Payload]) -> None:
    """Write ``parts`` in order on a non-blocking stream socket, without joining them (the
    kernel gathers them), waiting for room as needed. Raises OSError (a closed peer:
    BrokenPipeError, ConnectionResetError)."""
    views = [memoryview(part) for part in parts if len(part)]
    loop = asyncio.get_running_loop()
    while views:
        try:
            sent = sock.sendmsg(views[:IOV_BATCH])
        except BlockingIOError:
            sent = 0
        while sent:
            first = views[0]
            if sent < len(first):
                views[0] = first[sent:]
                break
            sent -= len(first)
            views.pop(0)
        if views:
            await _writable(loop, sock)


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, settle, ready)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


def settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
