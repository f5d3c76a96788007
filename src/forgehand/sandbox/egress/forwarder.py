"""In-sandbox forwarder: 127.0.0.1:3128 → the host egress proxy's unix socket.

Runs with the system Python and the standard library only, as a module
(`python3 -m forgehand.sandbox.egress.forwarder --socket PATH`) or as a plain file
(`python3 forwarder.py --socket PATH`). It relays raw bytes; every policy decision is
made by the proxy on the host. It prints one line when it is listening
(`listening on HOST:PORT`) and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3128
_CHUNK = 64 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _bridge(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, socket_path: str
) -> None:
    try:
        up_reader, up_writer = await asyncio.open_unix_connection(socket_path)
    except OSError as exc:
        print(f"forwarder: cannot reach egress proxy at {socket_path}: {exc}", file=sys.stderr)
        await _close(writer)
        return
    outgoing = asyncio.create_task(_pump(reader, up_writer))
    try:
        # The proxy decides when a connection ends: once it has closed, stop reading too.
        await _pump(up_reader, writer)
    finally:
        outgoing.cancel()
        await asyncio.gather(outgoing, return_exceptions=True)
        await _close(up_writer)
        await _close(writer)


async def serve(socket_path: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Listen on host:port and bridge every connection to `socket_path`, until cancelled."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _bridge(reader, writer, socket_path)

    server = await asyncio.start_server(on_client, host, port)
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]}:{bound[1]}, forwarding to {socket_path}", flush=True)
    async with server:
        await server.serve_forever()


async def _run_until_signalled(socket_path: str, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(serve(socket_path, host, port))
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--socket", required=True, help="path of the egress proxy's socket")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0 = any free)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_run_until_signalled(args.socket, args.host, args.port))
    except OSError as exc:
        print(f"forwarder: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
