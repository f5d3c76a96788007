"""``forgehand-runner``: the daemon that runs inside a sandbox.

forgehand-runner serve --socket PATH --state-dir DIR [--root DIR]… [--tcp HOST:PORT
                       --tls-cert F --tls-key F --token-file F]
forgehand-runner proxy --socket PATH
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forgehand.runner.config import RunnerConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgehand-runner", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--socket", type=Path, help="unix socket to listen on (mode 0600)")
    serve.add_argument("--state-dir", type=Path, required=True, help="journals live here")
    serve.add_argument("--root", type=Path, action="append", default=[], help="file RPC root")
    serve.add_argument("--tcp", help="also listen on HOST:PORT with TLS and a token")
    serve.add_argument("--tls-cert", type=Path)
    serve.add_argument("--tls-key", type=Path)
    serve.add_argument("--token-file", type=Path, help="file holding the bearer token")
    serve.add_argument("--max-runs", type=int, default=64)
    serve.add_argument("--journal-max-bytes", type=int, default=64 * 1024 * 1024)
    serve.add_argument("--memory-events", default="", help="cgroup memory.events for OOM")
    serve.add_argument("--log-level", default="WARNING")
    proxy = commands.add_parser("proxy", help="bridge stdin/stdout to the daemon's socket")
    proxy.add_argument("--socket", type=Path, required=True)
    return parser


async def _serve(args: argparse.Namespace, config: RunnerConfig) -> None:
    from forgehand.runner.server import RunnerServer

    token = args.token_file.read_text().strip() if args.token_file else None
    server = RunnerServer(
        config,
        unix_socket=args.socket,
        tcp=args.tcp,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=token,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        where = [str(args.socket)] if args.socket else []
        where += [f"tcp port {server.tcp_port}"] if args.tcp else []
        print(f"forgehand-runner: serving on {', '.join(where)}", file=sys.stderr, flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "proxy":
        from forgehand.runner.proxy import run

        return run(args.socket)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from forgehand.runner.tuning import tune_malloc

    tune_malloc()
    # Imported here so that `proxy`, which runs once per exec-channel connection, starts fast.
    from pydantic import ValidationError

    from forgehand.runner import errors
    from forgehand.runner.config import RunnerConfig

    try:
        config = RunnerConfig(
            state_dir=args.state_dir,
            roots=tuple(args.root),
            max_runs=args.max_runs,
            journal_max_bytes_per_run=args.journal_max_bytes,
            memory_events=args.memory_events,
        )
        asyncio.run(_serve(args, config))
    except ValidationError as exc:
        print(f"forgehand-runner: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    except errors.RunnerError as exc:
        print(f"forgehand-runner: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
