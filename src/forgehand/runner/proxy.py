"""``forgehand-runner proxy``: bridge this process's stdin/stdout to the runner's socket.

Run at the far end of any exec channel (``ssh host forgehand-runner proxy …``,
``kubectl exec -i …``, ``podman exec -i …``) so a client reaches the runner through that
channel's stdio. The bytes are the gRPC connection's own; the proxy does not look at them.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from forgehand.runner.pump import pump


async def bridge(socket_path: Path) -> int:
    loop = asyncio.get_running_loop()
    try:
        sock_reader, sock_writer = await asyncio.open_unix_connection(str(socket_path))
    except OSError as exc:
        sys.stderr.write(
            f"forgehand-runner proxy: cannot connect to {socket_path}: {exc.strerror}; "
            "is `forgehand-runner serve` running there?\n"
        )
        return 2
    stdin_reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stdin_reader), os.fdopen(0, "rb", buffering=0)
    )
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(1, "wb", buffering=0)
    )
    stdout_writer = asyncio.StreamWriter(transport, protocol, None, loop)
    upstream = asyncio.create_task(pump(stdin_reader, sock_writer))
    downstream = asyncio.create_task(pump(sock_reader, stdout_writer))
    # The channel ends when the runner closes the connection; stdin EOF only half-closes.
    await downstream
    upstream.cancel()
    await asyncio.gather(upstream, return_exceptions=True)
    return 0


def run(socket_path: Path) -> int:
    return asyncio.run(bridge(socket_path))
