"""How the keeper (``keeper.c``) is found and started, without importing anything heavy.

A sandbox's first process is the keeper (``supervise_argv``), which starts the daemon.
``forgehand-runner serve --supervise`` execs the same command line, before it imports
asyncio, gRPC or protobuf. So this module holds what both need, and only the standard
library: the binary's place, its options, and how ``python -m`` is spelled in a sandbox.
``keeper_client`` (the daemon's connection) builds on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forgehand.runner.config import RunnerConfig

KEEPER_BINARY = "forgehand-keeper"
KEEPER_IN_PACKAGE = PurePosixPath("forgehand", "runner", KEEPER_BINARY)
"""Where the keeper is below the directory holding the ``forgehand`` package (a sandbox
mounts that directory: the keeper comes with it)."""
KEEPER_COMM = "forgehand-keep"
"""The keeper's process name (``/proc/<pid>/comm``), by which the host tells it apart."""
DAEMON_MARK = b"\0forgehand.runner.cli\0serve\0"
"""In a daemon's cmdline (``python [flags] -m forgehand.runner.cli serve …``), by which the
host tells a supervising keeper's daemon from its runs."""
DEFAULT_MAX_RESTARTS = 5
"""Daemon crashes within a minute a supervising keeper restarts before it gives up."""
PYTHON_M_VARIABLE = "FORGEHAND_PYTHON_M"
"""In the runner's own environment, where set: the JSON list that stands for ``python -m``
in its sandbox (a custom root's, see ``forgehand.sandbox.layout``), for the step engine
and for the daemon a supervising keeper starts."""


@dataclass(frozen=True)
class KeeperSettings:
    """What the daemon tells the keeper when it starts it."""

    state_dir: str
    journal_max_bytes: int
    memory_events: str = ""


def keeper_settings(config: RunnerConfig) -> KeeperSettings:
    """What a daemon with ``config`` tells its keeper."""
    return KeeperSettings(
        state_dir=str(config.state_dir),
        journal_max_bytes=config.journal_max_bytes_per_run,
        memory_events=config.memory_events,
    )


def keeper_binary() -> Path:
    """The compiled keeper, which ``scripts/build-keeper`` builds beside this module:
    wherever the runner's package is, in every sandbox, so is the keeper."""
    return Path(__file__).with_name(KEEPER_BINARY)


def missing_keeper(package_root: Path | None = None) -> str:
    """Why the keeper cannot start, or "" when it is built. ``package_root``: the directory
    holding the ``forgehand`` package a sandbox mounts (default: this one's)."""
    binary = keeper_binary() if package_root is None else package_root / KEEPER_IN_PACKAGE
    if os.access(binary, os.X_OK):
        return ""
    return (
        f"the runner's keeper {binary} is not built: run scripts/build-keeper "
        "(it needs a C compiler: apt-get install gcc libc6-dev)"
    )


def keeper_arguments(settings: KeeperSettings) -> list[str]:
    """The keeper's options for ``settings``, common to ``serve`` and ``supervise``."""
    argv = ["--state-dir", settings.state_dir, "--journal-max-bytes"]
    argv.append(str(settings.journal_max_bytes))
    return argv + (["--memory-events", settings.memory_events] if settings.memory_events else [])


def supervise_argv(
    keeper: str | os.PathLike[str],
    settings: KeeperSettings,
    python_m: Sequence[str],
    serve: Sequence[str],
    max_restarts: int,
    sockets: Sequence[str | os.PathLike[str]] = (),
    ready_fd: int | None = None,
) -> list[str]:
    """``forgehand-keeper supervise``: the keeper at ``keeper`` (as the process that starts
    it sees the path) starts ``python_m forgehand.runner.cli SERVE`` (``serve``'s
    arguments, without ``--supervise`` or ``--ready-fd``) as the daemon, and again when it
    crashes. ``sockets``: the daemon's, removed when it dies. The first daemon gets
    ``--ready-fd``. Sandboxes run this as their first process; ``serve --supervise`` execs
    it."""
    argv = [os.fspath(keeper), "supervise", *keeper_arguments(settings)]
    argv += ["--max-restarts", str(max_restarts)]
    argv += ["--ready-fd", str(ready_fd)] if ready_fd is not None else []
    for socket in sockets:
        argv += ["--socket", os.fspath(socket)]
    return [*argv, "--", *python_m, "forgehand.runner.cli", *serve]


def python_m() -> list[str]:
    """``python -m`` for the runner's own Python programs: this interpreter, or what the
    sandbox says stands for it (``PYTHON_M_VARIABLE``)."""
    given = os.environ.get(PYTHON_M_VARIABLE, "")
    with contextlib.suppress(ValueError):
        argv = json.loads(given) if given else None
        if isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv):
            return argv
    return [sys.executable, "-m"]


def this_python_m() -> list[str]:
    """``python -m`` as this very interpreter was started: what the sandbox says stands for
    it, or this interpreter with the same flags (``-I``, ``-B``…)."""
    if PYTHON_M_VARIABLE in os.environ:
        return python_m()
    flags = sys.flags
    options = [
        ("-I", flags.isolated),
        ("-E", flags.ignore_environment and not flags.isolated),
        ("-s", flags.no_user_site and not flags.isolated),
        ("-S", flags.no_site),
        ("-B", flags.dont_write_bytecode),
        ("-P", flags.safe_path and not flags.isolated),
        ("-" + "O" * flags.optimize, flags.optimize),
    ]
    return [sys.executable, *(option for option, on in options if on), "-m"]
