"""``forgehand sandbox run|ls|gc`` and ``forgehand doctor``.

``sandbox run`` starts one sandbox, runs the command through its runner, writes the
command's stdout and stderr byte for byte to its own, and exits with the command's code.
A limit breach (oom, timeout, output limit) prints the reason on stderr and exits
non-zero (128 + signal when the command was killed, else 125), also where the breach
ends the whole sandbox (gVisor on out-of-memory or pids).

Nothing of the caller's environment goes in but what ``--env`` names (``NAME=VALUE``, or
``NAME`` for the caller's own value); ``--mount SRC[:DST]`` adds host paths read-only;
``--stdin`` forwards the caller's stdin to the command; ``--rootfs DIR`` runs it on
that root's programs instead of the host's (``forgehand.sandbox.layout``), ``--image
NAME`` on those of a container image in podman's local store (never pulled).
``--read-only-network`` makes the egress proxy (``--network proxy``) let only GET, HEAD
and OPTIONS through, over plain http.
Bad values exit 2 with what is wrong ("invalid sandbox options" names the field).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from forgehand.cli.runner import RUNNER_FAILURE, feed_stdin, stream_run
from forgehand.runner import errors as runner_errors
from forgehand.runner.model import RunSpec
from forgehand.sandbox import images
from forgehand.sandbox.backend import (
    CountsOomKills,
    EndsOnItsOwn,
    Sandbox,
    SandboxBackend,
    choose_backend,
    load_backends,
)
from forgehand.sandbox.errors import SandboxError
from forgehand.sandbox.runs import run_spec
from forgehand.sandbox.spec import Limits, SandboxSpec

WORK_ROOT = Path("/run/forgehand/work")
END_GRACE_SECONDS = 10.0
USAGE_ERROR = 2


def register(commands: Any) -> None:
    sandbox = commands.add_parser("sandbox", help="run commands in sandboxes, list, clean up")
    sub = sandbox.add_subparsers(dest="sandbox_command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run one command in a new sandbox")
    _run_options(run)
    run.set_defaults(handler=lambda a: _sync(_run(a)))
    ls = sub.add_parser("ls", help="list this machine's sandboxes")
    ls.set_defaults(handler=lambda a: _sync(_ls(a)))
    gc = sub.add_parser("gc", help="destroy sandboxes whose owner process is gone")
    gc.set_defaults(handler=lambda a: _sync(_gc(a)))
    doctor = commands.add_parser("doctor", help="which sandbox backends work here, and why")
    doctor.set_defaults(handler=_doctor)


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("bwrap", "gvisor", "podman"), default=None)
    parser.add_argument("--network", choices=("none", "proxy"), default="none")
    parser.add_argument(
        "--allow-host", action="append", default=[], metavar="HOST", help="repeatable"
    )
    parser.add_argument("--memory", default="512M", help="memory limit, e.g. 512M")
    parser.add_argument("--pids", type=int, default=256, help="processes and threads")
    parser.add_argument("--disk", default="1G", help="work dir and /tmp size cap")
    parser.add_argument("--timeout", type=float, default=60.0, help="wall time, seconds")
    parser.add_argument(
        "--isolation", choices=("process", "kernel", "container"), default="process"
    )
    _more_run_options(parser)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS…]")


def _more_run_options(parser: argparse.ArgumentParser) -> None:
    defaults = Limits()
    parser.add_argument(
        "--cpus",
        type=_cores,
        metavar="N",
        help=f"CPU bandwidth in cores, e.g. 1.5 (default {defaults.cpu_cores:g})",
    )
    parser.add_argument(
        "--output-limit",
        metavar="SIZE",
        help="output a command may write, e.g. 10M; past it the output is cut off and the "
        f"command stopped (default {defaults.output_bytes >> 20}M)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="set NAME in the sandbox; NAME alone passes this environment's value; "
        "repeatable. Nothing else of this environment goes in",
    )
    parser.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="SRC[:DST]",
        help="mount host path SRC read-only at DST (default: SRC); repeatable",
    )
    parser.add_argument(
        "--read-only-network",
        action="store_true",
        help="with --network proxy: only GET, HEAD, OPTIONS over plain http; https refused",
    )
    parser.add_argument("--stdin", action="store_true", help="forward this stdin to the command")
    parser.add_argument(
        "--rootfs",
        metavar="DIR",
        help="a root filesystem directory (an unpacked image) instead of the host's /usr; "
        "the command runs on its programs, read-only",
    )
    parser.add_argument(
        "--image",
        metavar="NAME",
        help="like --rootfs, from a container image already in podman's local store "
        "(never pulled), e.g. localhost/app:1",
    )


def _cores(text: str) -> float:
    """argparse type of --cpus: a finite number (its sign is the spec's to check)."""
    try:
        cores = float(text)
    except ValueError:
        cores = math.nan
    if not math.isfinite(cores):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of cores, e.g. 1.5")
    return cores


def build_spec(args: argparse.Namespace, work_dir: Path) -> SandboxSpec:
    """The SandboxSpec the ``sandbox run`` options describe."""
    network: dict[str, Any] = {"mode": args.network}
    if args.network == "proxy":
        network["allow_hosts"] = tuple(args.allow_host)
        network["read_only_methods"] = args.read_only_network
    limits: dict[str, Any] = {
        "memory_bytes": args.memory,
        "pids": args.pids,
        "disk_bytes": args.disk,
        "wall_time_seconds": args.timeout,
    }
    if args.cpus is not None:
        limits["cpu_cores"] = args.cpus
    if args.output_limit is not None:
        limits["output_bytes"] = args.output_limit
    return SandboxSpec.model_validate(
        {
            "work_dir": {"host_path": str(work_dir)},
            "limits": limits,
            "network": network,
            "isolation": args.isolation,
            "env": _environment(args.env),
            "ro_mounts": [_mount(item) for item in args.mount],
            "root": _root(args.rootfs, args.image),
        }
    )


def _root(rootfs: str | None, image: str | None) -> dict[str, str]:
    """``--rootfs DIR`` (relative to the current directory; it must be a directory) or
    ``--image NAME``; the host's by default."""
    if rootfs is not None and image is not None:
        raise _UsageError("give --rootfs or --image, not both")
    if image is not None:
        return {"type": "image", "name": image}
    if rootfs is None:
        return {"type": "host"}
    path = Path.cwd() / rootfs
    if not path.is_dir():
        raise _UsageError(f"--rootfs {rootfs}: no such directory")
    return {"type": "dir", "path": str(path)}


def _environment(items: list[str]) -> dict[str, str]:
    """``--env NAME=VALUE`` as given; ``--env NAME`` takes NAME's value from ours."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                raise _UsageError(
                    f"--env {name}: {name} is not set here; set it or give --env {name}=VALUE"
                )
            value = os.environ[name]
        env[name] = value
    return env


def _mount(item: str) -> dict[str, str]:
    """``--mount SRC[:DST]``: SRC relative to the current directory, which must exist."""
    source, sep, target = item.partition(":")
    path = Path.cwd() / source  # an absolute SRC stays as it is
    if not source or not path.exists():
        raise _UsageError(f"--mount {item}: no such host path {source!r}")
    return {"source": str(path), "target": target} if sep else {"source": str(path)}


def _command(args: argparse.Namespace) -> list[str]:
    command: list[str] = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.allow_host and args.network != "proxy":
        raise _UsageError("--allow-host needs --network proxy")
    if args.read_only_network and args.network != "proxy":
        raise _UsageError("--read-only-network needs --network proxy")
    if not command:
        raise _UsageError("give the command after --, e.g. `forgehand sandbox run -- echo hi`")
    return command


class _UsageError(Exception):
    pass


def _sync(coro: Any) -> int:
    try:
        code: int = asyncio.run(coro)
    except _UsageError as exc:
        print(f"forgehand: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except ValidationError as exc:
        print(f"forgehand: invalid sandbox options:\n{exc}", file=sys.stderr)
        return USAGE_ERROR
    except (SandboxError, runner_errors.RunnerError) as exc:
        print(f"forgehand: {exc}", file=sys.stderr)
        return RUNNER_FAILURE
    return code


async def _run(args: argparse.Namespace) -> int:
    command = _command(args)
    work_dir = WORK_ROOT / uuid.uuid4().hex[:16]
    spec = await asyncio.to_thread(build_spec, args, work_dir)  # it checks --mount paths
    backend = await asyncio.to_thread(choose_backend, spec, args.backend)
    await asyncio.to_thread(_make_work_root)
    async with backend.create(spec) as sandbox:
        return await _run_in(sandbox, spec, run_spec(spec, command, stdin=args.stdin))


async def _run_in(sandbox: Sandbox, spec: SandboxSpec, run: RunSpec) -> int:
    running = _start_and_stream(sandbox, run)
    if not isinstance(sandbox, EndsOnItsOwn):
        return await running
    # The sandbox may end under the run (gVisor on out-of-memory), even before its start
    # is answered: the client would only see the runner vanish, and retry for seconds
    # before saying so. The sandbox's watcher says why.
    streaming = asyncio.ensure_future(running)
    ending = asyncio.ensure_future(sandbox.wait_ended())
    try:
        await asyncio.wait({streaming, ending}, return_when=asyncio.FIRST_COMPLETED)
        if not streaming.done() and ending.exception() is not None:
            await asyncio.wait({streaming})  # the sandbox cannot say: the run decides
        elif not ending.done() and streaming.exception() is not None:
            # The runner vanished: give the sandbox's watcher time to say whether it ended.
            await asyncio.wait({ending}, timeout=END_GRACE_SECONDS)
    finally:
        for task in (streaming, ending):
            task.cancel()
        await asyncio.gather(streaming, ending, return_exceptions=True)
    end = None if ending.cancelled() or ending.exception() else ending.result()
    if end is not None and (streaming.cancelled() or streaming.exception() is not None):
        print(f"forgehand: the sandbox ended: {end}", file=sys.stderr)
        return RUNNER_FAILURE
    code = streaming.result()  # the run's own end, or its error
    if code != 0 and isinstance(sandbox, CountsOomKills) and await sandbox.oom_kills() > 0:
        limit = spec.limits.memory_bytes
        print(
            "forgehand: the run failed after the out-of-memory killer struck in the sandbox "
            f"(its memory limit is {limit} bytes; raise --memory)",
            file=sys.stderr,
        )
    return code


async def _start_and_stream(sandbox: Sandbox, spec: RunSpec) -> int:
    run_id = await sandbox.client.start(spec)
    feeder = asyncio.create_task(feed_stdin(sandbox.client, run_id)) if spec.stdin else None
    try:
        return await stream_run(sandbox.client, run_id, 0)
    finally:
        if feeder is not None:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)


def _make_work_root() -> None:
    WORK_ROOT.mkdir(mode=0o711, parents=True, exist_ok=True)


def _available_backends() -> list[SandboxBackend]:
    backends = [factory() for factory in load_backends().values()]
    return [backend for backend in backends if backend.availability().available]


async def _ls(_args: argparse.Namespace) -> int:
    failed = 0
    for backend in await asyncio.to_thread(_available_backends):
        try:
            records = await backend.list_sandboxes()
        except Exception as exc:  # one broken backend must not hide the others
            failed += _report_failure(backend, "ls", exc)
            continue
        for record in records:
            print(
                f"{record.backend}\t{record.sandbox_id}\t{record.state}\t"
                f"owner={record.owner_pid}\t{record.detail}"
            )
    return 1 if failed else 0


async def _gc(_args: argparse.Namespace) -> int:
    removed = failed = 0
    for backend in await asyncio.to_thread(_available_backends):
        try:
            records = await backend.reap()
        except Exception as exc:  # one broken backend must not stop the others' cleanup
            failed += _report_failure(backend, "gc", exc)
            continue
        for record in records:
            print(f"removed {record.backend} {record.sandbox_id} (owner {record.owner_pid} gone)")
        removed += len(records)
    print(f"{removed} leftover sandbox(es) removed")
    try:
        holds = await asyncio.to_thread(images.remove_orphan_holds)
    except SandboxError as exc:
        print(f"forgehand: removing orphaned image holds failed: {exc}", file=sys.stderr)
        return 1
    for name in holds:
        print(f"removed image hold {name} (its sandbox directory is gone)")
    return 1 if failed else 0


def _report_failure(backend: SandboxBackend, action: str, exc: Exception) -> int:
    print(
        f"forgehand: sandbox {action} failed for backend {backend.name}: {exc}; "
        "fix the cause and run it again",
        file=sys.stderr,
    )
    return 1


def _doctor(_args: argparse.Namespace) -> int:
    from forgehand.runner.keeper_launch import keeper_binary
    from forgehand.sandbox import rootfs

    usable = 0
    for name, factory in load_backends().items():
        try:
            status = factory().availability()
        except Exception as exc:  # a broken backend must not hide the others
            print(f"{name:8} broken     {type(exc).__name__}: {exc}")
            continue
        usable += status.available
        verdict = "available" if status.available else "missing  "
        print(f"{name:8} {verdict}  isolation={status.isolation}  {status.detail}")
    works, detail = images.availability()
    print(f"{'images':8} {'available' if works else 'missing  '}  {detail}")
    keeper = keeper_binary()
    keeper_built = os.access(keeper, os.X_OK)  # every sandbox's runner needs it
    if keeper_built:
        print(f"keeper   compiled   {keeper}")
    else:
        print(f"keeper   missing    {keeper}: run scripts/build-keeper (needs gcc, libc6-dev)")
    compiled = rootfs.compiled_subreaper()
    if compiled is not None:
        print(f"subreaper compiled   {compiled}")
    else:
        print(
            "subreaper script     the gvisor and podman sandboxes use the Python subreaper "
            "(about 4 MB more each): run scripts/setup on a machine with a C compiler"
        )
    if not usable:
        print("no sandbox backend works here: install `bubblewrap` (and run as root)")
    return 0 if usable and keeper_built else 1
