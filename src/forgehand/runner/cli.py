"""``forgehand-runner``: the daemon that runs inside a sandbox.

forgehand-runner serve --socket PATH --state-dir DIR [--root DIR]… [--tcp HOST:PORT
                       --tls-cert F --tls-key F --token-file F]
                       [--supervise [--max-restarts N]] [--ready-fd N]
forgehand-runner proxy --socket PATH

The runs themselves belong to the keeper, a small compiled program (``keeper_client``).
A plain ``serve`` finds the keeper of its state dir, or starts one that outlives it.
``--supervise`` is for the process a sandbox runs, whose exit ends the sandbox: it hands
over to the keeper at once (exec, before any heavy import), and the keeper starts this
daemon as its child, again when it crashes.

The daemon keeps out what it never uses (``_without_openssl``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from forgehand.runner.keeper_launch import DEFAULT_MAX_RESTARTS

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
    serve.add_argument(
        "--supervise",
        action="store_true",
        help="become the keeper and run the daemon as a child, restarted if it crashes "
        "(for the process a sandbox runs)",
    )
    serve.add_argument(
        "--max-restarts",
        type=int,
        default=DEFAULT_MAX_RESTARTS,
        help="with --supervise: give up (and exit) at the crash after this many restarts "
        "within a minute",
    )
    serve.add_argument(
        "--ready-fd", type=int, help="write 'ready' to this inherited fd once serving, close it"
    )
    proxy = commands.add_parser("proxy", help="bridge stdin/stdout to the daemon's socket")
    proxy.add_argument("--socket", type=Path, required=True)
    return parser


async def _serve(args: argparse.Namespace, config: RunnerConfig) -> None:
    import asyncio

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
        _announce_ready(args.ready_fd)
        await stop.wait()


def _without_openssl() -> None:
    """Serve as a Python built without OpenSSL would: keep ``ssl`` and ``_hashlib`` out.

    asyncio imports ``ssl`` (0.8 MB in each sandbox) only for SSL transports, and ``hmac``
    imports ``_hashlib`` (libcrypto, 0.4 MB of it written at load) only for its digests;
    both are written to fall back when these are missing. The runner opens no SSL
    transport (the TLS of ``--tcp`` is gRPC's own) and ``hmac.compare_digest`` compares
    the same without OpenSSL. A module this process already imported stays."""
    for name in ("ssl", "_hashlib"):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # import raises then


def _announce_ready(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.write(fd, b"ready\n")
    except OSError as exc:
        print(f"forgehand-runner: cannot write to --ready-fd {fd}: {exc}", file=sys.stderr)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "proxy":
        from forgehand.runner.proxy import run

        return run(args.socket)
    _without_openssl()
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # Imported here so that `proxy`, which runs once per exec-channel connection, starts fast.
    from forgehand.runner.config import ConfigError, RunnerConfig
    from forgehand.runner.tuning import tune_malloc

    try:
        config = RunnerConfig(
            state_dir=args.state_dir,
            roots=tuple(args.root),
            max_runs=args.max_runs,
            journal_max_bytes_per_run=args.journal_max_bytes,
            memory_events=args.memory_events,
        )
    except ConfigError as exc:
        print(f"forgehand-runner: invalid settings: {exc}", file=sys.stderr)
        return 2
    if args.supervise:
        return _exec_supervisor(args, config)
    tune_malloc()
    return _daemon(args, config, args.ready_fd)


def _exec_supervisor(args: argparse.Namespace, config: RunnerConfig) -> int:
    """Become the compiled keeper in supervise mode (``keeper.c``): it owns the runs and
    starts this same daemon, without ``--supervise``, as its child, again when it crashes.
    Called before the daemon's imports (``keeper_launch`` is stdlib only): this process only
    hands over. Returns only if the handover fails (status 2)."""
    from forgehand.runner.config import direct_socket_path
    from forgehand.runner.keeper_launch import (
        keeper_binary,
        keeper_settings,
        missing_keeper,
        supervise_argv,
        this_python_m,
    )

    try:
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        print(f"forgehand-runner: cannot create --state-dir: {exc}", file=sys.stderr)
        return 2
    missing = missing_keeper()
    if missing:
        print(f"forgehand-runner: {missing}", file=sys.stderr)
        return 2
    binary = keeper_binary()
    sockets = [] if args.socket is None else [args.socket, direct_socket_path(args.socket)]
    argv = supervise_argv(
        binary,
        keeper_settings(config),
        this_python_m(),
        _daemon_arguments(args, config),
        args.max_restarts,
        [socket for socket in sockets if socket is not None],
        args.ready_fd,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(binary, argv)  # noqa: S606  # no shell: the argv as it is
    except OSError as exc:
        print(f"forgehand-runner: cannot start the keeper {binary}: {exc}", file=sys.stderr)
    return 2


def _daemon_arguments(args: argparse.Namespace, config: RunnerConfig) -> list[str]:
    """``serve``'s arguments for the daemon a supervising keeper starts: this command's,
    without the supervision (and the ready fd, which the keeper adds for the first)."""
    argv = ["serve", "--state-dir", str(config.state_dir)]
    for flag, value in (
        ("--socket", args.socket),
        ("--tcp", args.tcp),
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
        ("--token-file", args.token_file),
    ):
        argv += [flag, str(value)] if value is not None else []
    for root in args.root:
        argv += ["--root", str(root)]
    argv += ["--max-runs", str(args.max_runs)]
    argv += ["--journal-max-bytes", str(args.journal_max_bytes)]
    argv += ["--memory-events", args.memory_events] if args.memory_events else []
    return [*argv, "--log-level", args.log_level]


def _daemon(args: argparse.Namespace, config: RunnerConfig, ready_fd: int | None) -> int:
    """Serve until SIGTERM or SIGINT; the exit status (2: the daemon cannot start)."""
    import asyncio

    from forgehand.runner import errors

    args.ready_fd = ready_fd
    try:
        asyncio.run(_serve(args, config))
    except errors.RunnerError as exc:
        print(f"forgehand-runner: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
