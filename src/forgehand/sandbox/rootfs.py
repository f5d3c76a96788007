"""What the OCI backends (gVisor, podman) share: a minimal rootfs and the runner's layout.

A sandbox's root is a small directory made per sandbox (``prepare_rootfs``): mount
points, the host's merged-/usr symlinks (``bin -> usr/bin`` …), a few copied /etc files
and generated ``passwd``/``group``/``hosts``. It is mounted read-only; /usr, the venv and
the forgehand source come in as read-only bind mounts. A custom root (``root: dir`` or
``image``) brings its own entries and /etc instead, and the runner its own userland
(``SandboxRoot``, ``forgehand.sandbox.layout``). Layout inside the sandbox::

    /opt/forgehand/venv, /opt/forgehand/src   the runner's interpreter and package (ro)
    /run/forgehand/runner.sock                  the runner's socket, when reached by exec
    /run/forgehand/sock/runner.sock             the runner's socket, in a host dir (podman;
                                                gVisor unless its runsc lacks host-uds)
    /run/forgehand/state/                       the runner's journals (tmpfs)
    /opt/forgehand/egress.sock                  the egress proxy's socket (network: proxy)

The venv and source go to fixed paths rather than the host's: the host's often lie below
the work dir's sandbox path (``/work``), and a mount inside the work dir would leave mount
points in the user's files. ``PYTHONPATH`` in the runner's own environment finds the
package; runs never see it (the runner gives a run only its ``RunSpec.env``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path, PurePosixPath
from typing import Any, Generic, Protocol, TypeVar, cast

import forgehand
from forgehand.runner.client import ExecConnector, RunnerClient
from forgehand.runner.config import direct_socket_path
from forgehand.runner.keeper_launch import (
    DEFAULT_MAX_RESTARTS,
    KEEPER_IN_PACKAGE,
    PYTHON_M_VARIABLE,
    KeeperSettings,
    missing_keeper,
    supervise_argv,
)
from forgehand.runner.model import Exited, ExitReason, Output, RunSpec
from forgehand.sandbox import bwrap, subreaper
from forgehand.sandbox.backend import Availability, SandboxRecord
from forgehand.sandbox.egress import AllowRule, EgressConfig, EgressProxy, Resolver
from forgehand.sandbox.egress.config import operator_trusted_networks
from forgehand.sandbox.errors import (
    BackendUnavailable,
    SandboxError,
    SandboxLaunchError,
    SandboxStateError,
)
from forgehand.sandbox.layout import (
    HOST_TOP_DIRS,
    OPT,
    SRC_TARGET,
    VENV_TARGET,
    Bind,
    CustomRoot,
    Link,
    custom_root,
    runner_userland,
)
from forgehand.sandbox.registry import Entry, Registry, list_records, reap_leftovers
from forgehand.sandbox.runs import EGRESS_LOG
from forgehand.sandbox.spec import RUNNER_STATE_DIR, IsolationLevel, ProxyNetwork, SandboxSpec

log = logging.getLogger(__name__)
T = TypeVar("T")
SETTLE_SECONDS = 60.0  # how long a cancelled start waits for a container command to end
SANDBOX_UID = 1000
SANDBOX_GID = 1000
SANDBOX_USER = "sandbox"
EGRESS_SOCKET = OPT / "egress.sock"
RUN_DIR = RUNNER_STATE_DIR
RUNNER_SOCKET = RUN_DIR / "runner.sock"
SOCK_DIR = RUN_DIR / "sock"
SHARED_SOCKET = SOCK_DIR / "runner.sock"
SOCK_DIR_BYTES = 64 << 10
RUNNER_STATE = RUN_DIR / "state"
RUNNER_PYTHON = VENV_TARGET / "bin" / "python"
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
_MERGED_USR = HOST_TOP_DIRS
_EMPTY_DIRS = ("proc", "dev", "sys", "tmp", "run", "etc", "usr", "opt/forgehand")
# /etc pieces programs need; never the whole /etc (shadow, ssh keys, pip.conf, ...).
# bwrap's list, without /etc/ca-certificates (update-ca-certificates' own settings, which
# the read-only OCI roots do not carry); the certificates themselves come with ssl/certs.
_HOST_ETC = tuple(name for name in bwrap.HOST_ETC if name != "ca-certificates")


@dataclass(frozen=True)
class RunnerInstall:
    """Where the runner's interpreter and package live on the host."""

    venv: Path
    source: Path

    @classmethod
    def current(cls) -> RunnerInstall:
        """The venv and forgehand source of this very process."""
        return cls(Path(sys.prefix), Path(forgehand.__file__).parents[1])

    def check(self) -> None:
        """Fail unless the venv's interpreter can run inside a sandbox that has only /usr,
        and the runner's keeper is built."""
        missing = missing_keeper(self.source)
        if missing:
            raise BackendUnavailable(missing)
        python = (self.venv / "bin" / "python").resolve()
        if not PurePosixPath(python).is_relative_to("/usr"):
            raise BackendUnavailable(
                f"the runner's interpreter {python} lives outside /usr, which is all a "
                "sandbox gets: build the venv on /usr/bin/python3 (apt-get install python3-venv)"
            )

    def mounts(self) -> list[tuple[Path, PurePosixPath]]:
        """(host source, sandbox target) pairs, all read-only."""
        return [(self.venv, VENV_TARGET), (self.source, SRC_TARGET)]


VENV_PYTHON_M = (str(RUNNER_PYTHON), "-m")


@dataclass(frozen=True)
class SandboxRoot:
    """What fills an OCI sandbox's root (see ``forgehand.sandbox.layout``): the read-only
    binds of the system (the host's dirs, or a custom root's entries) and of the runner,
    and what stands for ``python -m`` there."""

    binds: tuple[Bind, ...]
    custom: CustomRoot | None
    python_m: tuple[str, ...]

    @classmethod
    def for_spec(cls, spec: SandboxSpec) -> SandboxRoot:
        """Blocking: a custom root's directories are listed."""
        install = RunnerInstall.current()
        custom = custom_root(spec)
        if custom is None:
            system = [Bind(p, PurePosixPath(p)) for p in host_binds()]
            runner = [Bind(source, target) for source, target in install.mounts()]
            return cls((*system, *runner), None, VENV_PYTHON_M)
        userland = runner_userland(install.venv, install.source)
        return cls((*custom.binds, *userland.binds), custom, tuple(userland.python_m()))

    def runner_env(self, spec: SandboxSpec) -> dict[str, str]:
        """``runner_env``, plus how the runner starts Python (a custom root)."""
        env = runner_env(spec)
        if self.custom is not None:
            env[PYTHON_M_VARIABLE] = json.dumps(self.python_m)
        return env


def runner_argv(*arguments: str, python_m: Sequence[str] = VENV_PYTHON_M) -> list[str]:
    """``forgehand-runner ARGUMENTS`` as run inside the sandbox."""
    return [*python_m, "forgehand.runner.cli", *arguments]


def serve_argv(
    spec: SandboxSpec,
    memory_events: str = "",
    socket: PurePosixPath = RUNNER_SOCKET,
    python_m: Sequence[str] = VENV_PYTHON_M,
    *,
    keeper: PurePosixPath = SRC_TARGET / KEEPER_IN_PACKAGE,
    state_dir: PurePosixPath = RUNNER_STATE,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    ready_fd: int | None = None,
) -> list[str]:
    """A sandbox's long-lived process, in every backend: the keeper (``forgehand-keeper
    supervise``, at ``keeper`` as the sandbox sees it) on the work dir, which starts the
    daemon and restarts it when it crashes, so the sandbox and its runs outlive it. As a
    container's init it also reaps orphans."""
    journal = max(256 << 10, min(64 << 20, spec.limits.output_bytes + (1 << 20)))
    serve = ["serve", "--socket", str(socket), "--state-dir", str(state_dir)]
    serve += ["--root", str(spec.work_dir.sandbox_path), "--journal-max-bytes", str(journal)]
    serve += ["--memory-events", memory_events] if memory_events else []
    direct = direct_socket_path(Path(socket))
    return supervise_argv(
        keeper,
        KeeperSettings(str(state_dir), journal, memory_events),
        python_m,
        serve,
        max_restarts,
        [socket] if direct is None else [socket, direct],
        ready_fd,
    )


def proxy_argv(python_m: Sequence[str] = VENV_PYTHON_M) -> list[str]:
    """The in-sandbox end of an exec channel: stdin/stdout bridged to the runner socket."""
    return runner_argv("proxy", "--socket", str(RUNNER_SOCKET), python_m=python_m)


MAX_STACKED_MOUNTS = 8


def exec_client(argv: list[str]) -> RunnerClient:
    """A runner client whose every connection runs ``argv`` (``… forgehand-runner proxy``)."""
    return RunnerClient.connect(ExecConnector(argv))


async def mount_sock_dir(host_path: Path) -> None:
    """A tiny tmpfs, mode 0700, owned by the sandbox user: the runner's socket goes there.
    Small, so the sandbox cannot fill the host's disk through it."""
    await blocking(host_path.mkdir, 0o700)
    options = f"size={SOCK_DIR_BYTES},nr_inodes=16,mode=0700,uid={SANDBOX_UID},gid={SANDBOX_GID}"
    options += ",nosuid,nodev,noexec"
    await run_host(["mount", "-t", "tmpfs", "-o", options, "forgehand-sock", str(host_path)])


async def unmount_sock_dir(host_path: Path) -> None:
    """Unmount ``mount_sock_dir``'s tmpfs, if mounted (the state dir's removal does the rest)."""
    for _ in range(MAX_STACKED_MOUNTS):
        if not await blocking(is_mount_point, host_path):
            return
        await run_host(["umount", str(host_path)])


def runner_env(spec: SandboxSpec) -> dict[str, str]:
    """The runner process's environment: neutral defaults plus exactly the spec's env."""
    env = {
        "PATH": SANDBOX_PATH,
        "HOME": str(spec.work_dir.sandbox_path),
        "USER": SANDBOX_USER,
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "PIP_CONFIG_FILE": "/dev/null",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    return env | spec.env | {"PYTHONPATH": str(SRC_TARGET)}


def etc_files(spec: SandboxSpec) -> dict[str, str]:
    """Generated /etc files: the sandbox user exists, the host's accounts do not."""
    home = spec.work_dir.sandbox_path
    return {
        "passwd": (
            f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_GID}:forgehand sandbox:{home}:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "group": f"{SANDBOX_USER}:x:{SANDBOX_GID}:\nnogroup:x:65534:\n",
        "hosts": "127.0.0.1 localhost sandbox\n::1 localhost ip6-localhost\n",
        "hostname": "sandbox\n",
        "resolv.conf": "",
    }


def host_binds() -> list[Path]:
    """Top-level host dirs to bind read-only: /usr, plus any of /bin, /lib… not symlinks."""
    real = [Path("/", n) for n in _MERGED_USR if Path("/", n).is_dir()]
    return [Path("/usr"), *(p for p in real if not p.is_symlink())]


def prepare_rootfs(
    dest: Path,
    spec: SandboxSpec,
    mount_points: Iterable[PurePosixPath],
    root: SandboxRoot,
) -> Path:
    """Make the per-sandbox root directory ``dest`` (blocking; use ``asyncio.to_thread``):
    the mount points of ``root``'s binds and of ``mount_points``, top-level symlinks, and
    /etc (the host's chosen files, or a custom root's own) with the generated files."""
    dest.mkdir(mode=0o755)
    for name in _EMPTY_DIRS:
        (dest / name).mkdir(parents=True, exist_ok=True)
    if root.custom is None:
        _link_merged_usr(dest)
        _copy_host_etc(dest / "etc")
    else:
        for link in root.custom.links:
            (dest / link.path.relative_to("/")).symlink_to(link.to)
        _copy_root_etc(root.custom, dest / "etc")
    for name, text in etc_files(spec).items():
        (dest / "etc" / name).write_text(text)
    for bind in root.binds:
        _make_mount_point(dest, bind.target, file=bind.source.is_file())
    for point in mount_points:
        _make_mount_point(dest, point)
    # podman copies a tmpfs's mode (not its owner) from the directory below it.
    for scratch in (dest / "tmp", dest / RUN_DIR.relative_to("/")):
        if scratch.is_dir():
            scratch.chmod(0o1777)
    return dest


def _link_merged_usr(dest: Path) -> None:
    for name in _MERGED_USR:
        host = Path("/", name)
        if host.is_symlink():
            (dest / name).symlink_to(os.readlink(host))
        elif host.is_dir():
            (dest / name).mkdir()


def _copy_host_etc(etc: Path) -> None:
    for name in _HOST_ETC:
        source, target = Path("/etc", name), etc / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, target, symlinks=True)
        elif source.exists() or source.is_symlink():
            shutil.copy2(source, target, follow_symlinks=False)


ROOT_ETC_MAX_BYTES = 64 << 20
"""The largest custom root /etc the OCI backends copy per sandbox (real ones are a few MB)."""


def _copy_root_etc(root: CustomRoot, etc: Path) -> None:
    """A custom root's /etc entries (``layout.custom_root`` left out the generated ones),
    copied as they are, symlinks as symlinks: a sandbox's /etc is small and its own. One
    too large to copy for every sandbox is refused rather than filling the host's disk."""
    size = sum(_tree_bytes(e.source) for e in root.etc if isinstance(e, Bind))
    if size > ROOT_ETC_MAX_BYTES:
        raise SandboxLaunchError(
            f"the root's /etc holds {size} bytes, more than the {ROOT_ETC_MAX_BYTES} a sandbox "
            "copies: trim it (caches, logs and data do not belong in /etc)"
        )
    for entry in root.etc:
        target = etc / (entry.path if isinstance(entry, Link) else entry.target).name
        if isinstance(entry, Link):
            target.symlink_to(entry.to)
        elif entry.source.is_dir():
            shutil.copytree(entry.source, target, symlinks=True, ignore=_special_files)
        else:
            shutil.copy2(entry.source, target, follow_symlinks=False)


def _tree_bytes(path: Path) -> int:
    """The bytes of the regular files at or below ``path``, symlinks not followed."""
    if not path.is_dir():
        return path.lstat().st_size
    total = 0
    for directory, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_size
    return total


def _special_files(directory: str, names: list[str]) -> set[str]:
    """Devices, sockets and fifos in a root's /etc: not copied."""
    paths = {name: os.path.join(directory, name) for name in names}
    return {
        name
        for name, path in paths.items()
        if not (os.path.islink(path) or os.path.isdir(path) or os.path.isfile(path))
    }


def _make_mount_point(root: Path, point: PurePosixPath, *, file: bool = False) -> None:
    path = root / point.relative_to("/")
    if file or point == EGRESS_SOCKET:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    else:
        path.mkdir(parents=True, exist_ok=True)


def check_work_path(spec: SandboxSpec) -> None:
    """Refuse a work dir that would hide or sit inside the runner's own mounts."""
    inside = PurePosixPath(spec.work_dir.sandbox_path)
    for own in (OPT, RUN_DIR, PurePosixPath("/usr"), PurePosixPath("/etc")):
        if inside.is_relative_to(own) or own.is_relative_to(inside):
            raise SandboxLaunchError(
                f"work_dir.sandbox_path {inside} collides with {own}, which the sandbox "
                "needs for itself: choose another path such as /work"
            )


async def mount_work_dir(host_path: Path, size: int) -> bool:
    """Mount a size-capped tmpfs owned by the sandbox user; True if the dir was made."""
    made = not await blocking(host_path.exists)
    await blocking(host_path.mkdir, 0o755, True, True)
    options = f"size={size},mode=0755,uid={SANDBOX_UID},gid={SANDBOX_GID},nosuid,nodev"
    await run_host(["mount", "-t", "tmpfs", "-o", options, "forgehand-work", str(host_path)])
    return made


async def unmount_work_dir(host_path: Path, made: bool) -> None:
    """Unmount the work dir's tmpfs (its content goes with it); remove the dir if ours."""
    for _ in range(MAX_STACKED_MOUNTS):
        if not await blocking(is_mount_point, host_path):
            break
        await run_host(["umount", str(host_path)])
    if made and await blocking(host_path.exists):
        await blocking(host_path.rmdir)


def is_mount_point(path: Path) -> bool:
    """Whether ``path`` is a mount point in this mount namespace."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    return any(line.split()[1] == str(path) for line in mounts if line.strip())


async def run_host(argv: Sequence[str], *, check: bool = True) -> tuple[int, str]:
    """Run a host tool; its exit status and output (stderr folded into stdout)."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except FileNotFoundError as exc:
        raise BackendUnavailable(f"{argv[0]} not found: install it (see availability())") from exc
    log.debug("started %s", " ".join(argv))
    try:
        output, _ = await process.communicate()
    except asyncio.CancelledError:
        await uncancellable(_kill_and_wait(process))
        raise
    text = output.decode(errors="replace").strip()
    code = process.returncode if process.returncode is not None else -1
    log.debug("status %s of %s", code, argv[:4])
    if check and code != 0:
        raise SandboxLaunchError(f"`{' '.join(argv)}` failed with status {code}: {text[-2000:]}")
    return code, text


async def _kill_and_wait(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()


def tail(path: Path, limit: int = 2000) -> str:
    """The last ``limit`` bytes of a log file, or '' if it cannot be read."""
    try:
        return path.read_bytes()[-limit:].decode(errors="replace").strip()
    except OSError:
        return ""


class EgressSettings(Protocol):
    """The backend settings ``start_egress`` reads."""

    egress_ports: tuple[int, ...]
    trusted_networks: tuple[IPv4Network | IPv6Network, ...]
    allow_loopback_for_tests: bool


FORWARDER_RUN_ID = "forgehand-egress-forwarder"


def egress_mounts(proxy: EgressProxy) -> list[tuple[Path, PurePosixPath, bool]]:
    """(host source, sandbox target, writable) of the proxy's socket and its decision log,
    which the agent reads (read-only) at ``runs.EGRESS_LOG``."""
    return [
        (proxy.socket_path, EGRESS_SOCKET, True),
        (proxy.decision_log_path, PurePosixPath(EGRESS_LOG), False),
    ]


async def start_egress(
    directory: Path,
    network: ProxyNetwork,
    config: EgressSettings,
    resolver: Resolver | None = None,
    owner: tuple[int, int] = (SANDBOX_UID, SANDBOX_GID),
) -> EgressProxy:
    """A host-side allowlisting proxy for one sandbox, on a socket ``owner`` (the sandbox
    user's host uid and gid) may use. Its decision log is ``egress/decisions.jsonl``,
    mounted read-only at ``runs.EGRESS_LOG``. The trusted networks are the backend's and
    the operator's (``FORGEHAND_TRUSTED_NETWORKS``); ``network.read_only_methods`` turns on
    the proxy's read-only mode."""
    egress = directory / "egress"
    await blocking(egress.mkdir, 0o711)
    try:
        settings = EgressConfig(
            socket_path=egress / "egress.sock",
            decision_log_path=egress / "decisions.jsonl",
            allow=tuple(AllowRule(host=h, ports=config.egress_ports) for h in network.allow_hosts),
            read_only=network.read_only_methods,
            trusted_networks=(*config.trusted_networks, *operator_trusted_networks()),
            allow_loopback_for_tests=config.allow_loopback_for_tests,
        )
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise SandboxLaunchError(f"the egress proxy's settings are invalid: {exc}") from None
    proxy = EgressProxy(settings, resolver=resolver)
    try:
        await proxy.start()
        await blocking(os.chown, proxy.socket_path, *owner)
    except BaseException:  # the caller never gets the proxy: stop it here
        await uncancellable(proxy.stop())
        raise
    return proxy


async def start_forwarder(client: RunnerClient, python_m: Sequence[str] = VENV_PYTHON_M) -> None:
    """Start the in-sandbox forwarder (127.0.0.1:3128 → egress socket) as a runner run."""
    module = ("forgehand.sandbox.egress.forwarder", "--socket", str(EGRESS_SOCKET))
    env = {"PATH": SANDBOX_PATH, "PYTHONPATH": str(SRC_TARGET)}
    spec = RunSpec(argv=(*python_m, *module), env=env, cwd="/")
    await client.start(spec, FORWARDER_RUN_ID)
    await _await_output(client, b"listening on")


async def _await_output(client: RunnerClient, marker: bytes) -> None:
    seen = b""
    events = cast(AsyncGenerator[object, None], client.attach(FORWARDER_RUN_ID))
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, Output):
                seen += event.data
                if marker in seen:
                    return
            if isinstance(event, Exited):
                break
    raise SandboxLaunchError(f"the egress forwarder exited: {seen[-500:]!r}")


COMPILED_SUBREAPER = "forgehand-subreaper"
"""The compiled subreaper (``subreaper.c``), which ``scripts/setup`` builds into the
virtualenv's ``bin``."""


def compiled_subreaper() -> Path | None:
    """The compiled subreaper beside this interpreter, if it was built (never from PATH:
    it runs as the host's user)."""
    path = Path(sys.prefix) / "bin" / COMPILED_SUBREAPER
    return path if path.is_file() and os.access(path, os.X_OK) else None


def subreaper_argv(command: list[str]) -> list[str]:
    """``command`` run under our subreaper: the compiled one (0.3 MB), else
    ``forgehand.sandbox.subreaper`` as a script (stdlib only, about 4 MB more)."""
    compiled = compiled_subreaper()
    if compiled is not None:
        return [str(compiled), *command]
    return [sys.executable, "-I", "-S", str(Path(subreaper.__file__)), *command]


async def spawn_subreaper(command: list[str], log: Path) -> asyncio.subprocess.Process:
    """Start ``command`` under a subreaper of ours, in a new session, its output appended
    to ``log``. For runtimes that daemonize (``runsc run --detach``, conmon): what they
    leave behind is re-parented to the subreaper, which reaps it, not to PID 1, which
    does not reap on every machine. Read the exit code with ``subreaper_status``."""
    fd = await blocking(_open_log, log)
    try:
        return await asyncio.create_subprocess_exec(
            *subreaper_argv(command),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=fd,
            start_new_session=True,
        )
    finally:
        os.close(fd)


async def subreaper_status(process: asyncio.subprocess.Process) -> int | None:
    """The exit code of the subreaper's command, or None if the subreaper failed.

    A cancelled caller still waits (up to ``SETTLE_SECONDS``) for the command to end:
    deleting a container while ``runsc run`` or ``podman run`` is half-way through
    creating it leaves what they create afterwards behind."""
    assert process.stdout is not None
    line = (await finishing(process.stdout.readline(), SETTLE_SECONDS)).strip()
    return int(line) if line.lstrip(b"-").isdigit() else None


async def await_subreaper(
    process: asyncio.subprocess.Process | None, patience: float, sandbox: str, after: str
) -> None:
    """Wait for the subreaper to exit, which it does once every descendant has ended and
    been reaped. If it has not after ``patience`` seconds, kill it and raise SandboxError
    saying that processes of ``sandbox`` outlived ``after`` (the runtime's delete)."""
    if process is None:
        return
    try:
        async with asyncio.timeout(patience):
            await process.wait()
        return
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
    raise SandboxError(
        f"processes of {sandbox} outlived {after} by {patience:g}s; find them with "
        "`ps -ef --forest` under the sandbox's subreaper"
    )


def _open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


async def wait_exit(pidfd: int) -> None:
    """Return once the process behind ``pidfd`` has exited; no thread, no helper process."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)


async def finishing(work: Awaitable[T], limit: float | None = None) -> T:
    """Await ``work``; if the caller is cancelled meanwhile, first let ``work`` finish (for
    at most ``limit`` seconds), then let the cancellation go on. For steps that create
    things outside this process, which the cleanup after a cancel must not race."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(task, limit)
        raise


async def blocking(fn: Callable[..., T], /, *args: Any) -> T:
    """``asyncio.to_thread`` through ``finishing``: a thread cannot be stopped, so a
    cancelled caller waits for it instead of cleaning up while it still writes files."""
    return await finishing(asyncio.to_thread(fn, *args))


async def uncancellable(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end even if the caller is cancelled meanwhile (then re-raise)."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


class SandboxState(StrEnum):
    """Lifecycle of a gVisor or podman sandbox."""

    CREATED = "created"
    STARTING = "starting"
    READY = "ready"
    ENDED = "ended"
    """The sandbox stopped on its own (see ``ended``): only destroy remains."""
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    FAILED = "failed"
    """Start or destroy failed; ``reap`` removes what is left once the owner is gone."""


@dataclass(frozen=True)
class SandboxEnd:
    """Why a sandbox stopped before it was destroyed."""

    reason: ExitReason
    """``oom``, ``limit`` (pids), ``timeout`` (wall time) or ``exited``."""
    detail: str

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


class ManagedSandbox:
    """The start/destroy lifecycle the gVisor and podman sandboxes share. A subclass sets
    ``state``, ``spec``, ``_id``, ``_registry``, ``_ended``, ``_watcher``, ``_sock_dir`` and
    the mount flags and provides ``_launch`` (set up, return once the runner answers) and
    ``_teardown`` (every cleanup step; the failures, usually through ``_cleanup``)."""

    state: SandboxState
    spec: SandboxSpec
    _id: str
    _dir: Path
    _registry: Registry
    _sandbox_root: SandboxRoot | None
    _ended: SandboxEnd | None
    _watcher: asyncio.Task[None] | None
    _sock_dir: Path
    _sock_mounted: bool
    _work_made: bool
    _work_mounted: bool
    image_podman = "podman"
    """The podman whose store an image root comes from (see ``forgehand.sandbox.images``)."""

    @property
    def work_dir(self) -> Path:
        return self.spec.work_dir.host_path

    # Each mount is marked before it is made: a start cancelled during `mount` may leave
    # it mounted, and the unmounts check what is mounted.

    async def _mount_sock(self) -> None:
        self._sock_mounted = True
        await mount_sock_dir(self._sock_dir)

    async def _mount_work(self) -> None:
        self._work_mounted = True
        await mount_work_dir(self.work_dir, self.spec.work_dir_bytes)

    def _root(self) -> SandboxRoot:
        """The root as laid out at start (``SandboxRoot.for_spec``)."""
        if self._sandbox_root is None:
            raise SandboxStateError(f"sandbox {self._id}: its root is not laid out yet")
        return self._sandbox_root

    async def _release_image(self) -> None:
        from forgehand.sandbox import images

        await blocking(images.release, self._dir, self.image_podman)

    async def _unmount_sock(self) -> None:
        if self._sock_mounted:
            await unmount_sock_dir(self._sock_dir)
            self._sock_mounted = False

    async def _unmount_work(self) -> None:
        if self._work_mounted:
            await unmount_work_dir(self.work_dir, self._work_made)
            self._work_mounted = False

    async def _cleanup(self, steps: Sequence[Callable[[], Awaitable[None]]]) -> list[BaseException]:
        """Run every step, whatever the others did; the record goes last, and only if all
        else worked (so ``gc`` can still find what is left). The failures."""
        failures: list[BaseException] = []
        for step in steps:
            try:
                await step()
            except Exception as exc:
                failures.append(exc)
        if not failures:
            await blocking(self._registry.remove, self._id)
        return failures

    async def _stop_watcher(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None

    async def _launch(self) -> None:
        raise NotImplementedError

    async def _teardown(self) -> list[BaseException]:
        raise NotImplementedError

    async def wait_ended(self) -> SandboxEnd:
        """Wait until the sandbox stops on its own and say why."""
        if self._watcher is not None:
            await asyncio.shield(self._watcher)
        if self._ended is None:
            raise SandboxStateError(f"sandbox {self._id} is {self.state.value}, not running")
        return self._ended

    async def start(self) -> None:
        """Set everything up and return once the runner answers."""
        self._require(SandboxState.CREATED, "start")
        self.state = SandboxState.STARTING
        try:
            await self._launch()
        except BaseException:
            await uncancellable(self._teardown_quietly())
            self.state = SandboxState.FAILED
            raise
        self.state = SandboxState.READY

    async def destroy(self) -> None:
        """Kill the sandbox and remove every trace. Idempotent; survives cancellation."""
        if self.state in (SandboxState.DESTROYED, SandboxState.CREATED):
            return
        await uncancellable(self._destroy())

    async def _destroy(self) -> None:
        self.state = SandboxState.DESTROYING
        failures = await self._teardown()
        if failures:
            self.state = SandboxState.FAILED
            raise SandboxError(
                f"sandbox {self._id} was not fully destroyed ({failures[0]}); "
                "`forgehand sandbox gc` removes what is left once this process has ended"
            ) from failures[0]
        self.state = SandboxState.DESTROYED

    async def _teardown_quietly(self) -> None:
        await self._teardown()

    def _require(self, state: SandboxState, action: str) -> None:
        if self.state is not state:
            why = f" ({self._ended.detail})" if self._ended else ""
            raise SandboxStateError(
                f"cannot {action} sandbox {self._id}: it is {self.state.value}{why}"
            )


class BackendSettings(Protocol):
    """What ``ManagedBackend`` reads of a backend's settings."""

    @property
    def state_dir(self) -> Path: ...


ConfigT = TypeVar("ConfigT", bound=BackendSettings)
SandboxT = TypeVar("SandboxT", bound=ManagedSandbox)


class ManagedBackend(Generic[ConfigT, SandboxT]):
    """What the gVisor and podman backends share: their settings and registry, creating a
    sandbox that is destroyed on every path, availability, ``ls`` and ``gc``. A backend
    says how to check the host, make a sandbox and reap a dead owner's leftovers."""

    name: str
    isolation: IsolationLevel

    def __init__(self, config: ConfigT | None = None, *, resolver: Resolver | None = None) -> None:
        self.config = config if config is not None else self._default_config()
        self.resolver = resolver
        """The egress proxy's resolver (None: the system's); tests map names to loopback."""
        self.registry = Registry(self.config.state_dir)

    def _default_config(self) -> ConfigT:
        raise NotImplementedError

    def _check_host(self) -> str:
        """What works here, or raise SandboxError saying what to install."""
        raise NotImplementedError

    def _sandbox(self, spec: SandboxSpec) -> SandboxT:
        raise NotImplementedError

    async def _reap_entry(self, entry: Entry) -> None:
        raise NotImplementedError

    def availability(self) -> Availability:
        try:
            detail = self._check_host()
        except SandboxError as exc:
            return Availability(self.name, False, self.isolation, str(exc))
        return Availability(self.name, True, self.isolation, detail)

    def create(self, spec: SandboxSpec) -> contextlib.AbstractAsyncContextManager[SandboxT]:
        """Start a sandbox; it is destroyed on every path out of the ``async with``."""
        return self._create(spec)

    @contextlib.asynccontextmanager
    async def _create(self, spec: SandboxSpec) -> AsyncGenerator[SandboxT, None]:
        sandbox = self._sandbox(spec)
        await sandbox.start()
        try:
            yield sandbox
        finally:
            await sandbox.destroy()

    async def list_sandboxes(self) -> list[SandboxRecord]:
        return await list_records(self.registry, self.name)

    async def reap(self) -> list[SandboxRecord]:
        return await reap_leftovers(self.registry, self.name, self._reap_entry)
