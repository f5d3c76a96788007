"""A unix-socket relay in its own process, for cutting connections under load.

``python -m forgehand.bench.relay LISTEN TARGET``: forwards every connection on LISTEN to
TARGET; SIGUSR1 aborts all connections open at that moment (both sides, as a network
failure would). Prints ``ready`` once it listens. Standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from forgehand.runner.pump import pump


class Relay:
    def __init__(self, target: str) -> None:
        self.target = target
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers += [writer, up_writer]
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        for w in (writer, up_writer):
            w.close()

    def cut(self) -> None:
        cut, self.writers = self.writers, []
        for writer in cut:
            with contextlib.suppress(Exception):
                writer.transport.abort()


async def main(listen: str, target: str) -> None:
    relay = Relay(target)
    server = await asyncio.start_unix_server(relay.serve, listen)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, relay.cut)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    relay.cut()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
