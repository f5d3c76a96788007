"""The bubblewrap backend: a ``BwrapSandbox`` whose one long-lived process is the runner.

    backend = BwrapBackend()
    async with backend.create(spec) as sandbox:
        result = await sandbox.run(["pytest", "-q"])        # = client.run(sandbox.run_spec(…))

Layout inside the sandbox (host side under ``<state_dir>/<sandbox-id>/``)::

    /run/forgehand/sock/runner.sock      ← host sock/ (bind): the runner's gRPC socket
    /run/forgehand/state/                  tmpfs: the runner's journals
    /run/forgehand/memory.events         ← the cgroup's OOM counter, read-only
    /run/forgehand/egress.sock           ← host egress/egress.sock   (network: proxy)
    /run/forgehand/egress-decisions.jsonl ← host egress/decisions.jsonl, read-only
    <venv> and <forgehand source>          read-only at the host's paths, with /usr

bwrap's command is the runner's keeper (``forgehand-keeper supervise``, see
``forgehand.runner.keeper_launch``), which owns the runs, starts the daemon and restarts it
if it crashes, so a daemon killed inside the sandbox takes neither the sandbox nor its
runs along; attached clients reconnect and resume.

With ``network: proxy`` a host-side ``EgressProxy`` serves the sandbox, and the runner's
first run is the forwarder on 127.0.0.1:3128; runs made with ``sandbox.run_spec`` get the
proxy variables (see ``forgehand.sandbox.runs``). ``limits.wall_time_seconds`` bounds
every run (its timeout) and the sandbox: a little later the watchdog kills every process
and the sandbox is ``EXPIRED``. Destroy — on every path out of ``create`` — kills the
cgroup, removes it, unmounts and removes the work dir if the backend made it, stops the
proxy and removes the sandbox's state dir. A crashed owner's leftovers are found through
the registry (``forgehand.sandbox.registry``) and removed by ``reap``.
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path, PurePosixPath
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

import forgehand
from forgehand.runner import errors as runner_errors
from forgehand.runner.client import RunnerClient
from forgehand.runner.keeper_launch import (
    DAEMON_MARK,
    KEEPER_COMM,
    KEEPER_IN_PACKAGE,
    PYTHON_M_VARIABLE,
    missing_keeper,
)
from forgehand.runner.model import Exited, Output, RunResult, RunSpec
from forgehand.sandbox import cgroups, images, rootfs, seccomp
from forgehand.sandbox.backend import Achieved, Availability, SandboxRecord, register_backend
from forgehand.sandbox.bwrap import (
    EGRESS_SOCKET,
    BwrapSandbox,
    Identity,
    check_isolation,
    find_bwrap,
    run_host,
)
from forgehand.sandbox.egress.proxy import EgressProxy
from forgehand.sandbox.egress.resolver import Resolver
from forgehand.sandbox.errors import (
    BackendUnavailable,
    IsolationUnavailable,
    SandboxError,
    SandboxLaunchError,
    SandboxStateError,
)
from forgehand.sandbox.layout import SRC_TARGET, RunnerUserland, runner_userland
from forgehand.sandbox.registry import (
    DEFAULT_ROOT,
    Entry,
    Registry,
    list_records,
    own_entry,
    reap_leftovers,
)
from forgehand.sandbox.runs import EGRESS_LOG, run_environment, run_spec
from forgehand.sandbox.sockets import PinnedSocketConnector
from forgehand.sandbox.spec import (
    ByteSize,
    DirRoot,
    IsolationLevel,
    Limits,
    OpenNetwork,
    ProxyNetwork,
    SandboxSpec,
)

NAME = "bwrap"
SOCK_DIR = "/run/forgehand/sock"
RUNNER_SOCKET = f"{SOCK_DIR}/runner.sock"
RUNNER_STATE = "/run/forgehand/state"
MEMORY_EVENTS = "/run/forgehand/memory.events"
FORWARDER_RUN_ID = "forgehand-egress-forwarder"
LOG_TAIL_BYTES = 2000
SOCK_DIR_BYTES = 64 << 10
DAEMON_OOM_SCORE_ADJ = -999
# -I: no PYTHON* variables, user site or work dir on sys.path (a repository checked out
# there must not shadow the runner's modules); -B: the root is read-only, so never try to
# write bytecode (the venv's and the source tree's caches are read instead).
RUNNER_PYTHON_FLAGS = ("-I", "-B")


def _proc_text(pid: int, name: str) -> str:
    """/proc/PID/NAME, or "" once the process is gone."""
    try:
        return Path(f"/proc/{pid}/{name}").read_text(errors="replace")
    except OSError:
        return ""


def _proc_cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _venv() -> Path:
    return Path(sys.prefix)


def _package_root() -> Path:
    return Path(forgehand.__file__).parents[1]


class BwrapBackendConfig(BaseModel):
    """Settings of the bubblewrap backend, read once when the backend is made."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    type: Literal["bwrap"] = "bwrap"
    """Backend discriminator."""
    state_dir: Path = DEFAULT_ROOT
    """Host directory of the sandbox registry and each sandbox's sockets and logs."""
    venv: Path = Field(default_factory=_venv)
    """The virtualenv whose python runs ``forgehand-runner`` (mounted read-only)."""
    package_root: Path = Field(default_factory=_package_root)
    """The directory holding the ``forgehand`` package (mounted read-only)."""
    ready_timeout_seconds: float = Field(default=30.0, gt=0)
    """How long ``create`` waits for the runner (and forwarder) to answer."""
    runner_state_bytes: ByteSize = 256 << 20
    """Size of the tmpfs holding the runner's journals inside the sandbox."""
    runner_memory_bytes: ByteSize = 128 << 20
    """Added to the spec's memory limit: the runner and its keeper live in the same cgroup
    (about 70 MiB), and the spec's limit is meant for the work."""
    runner_pids: int = Field(default=32, ge=0)
    """Added to the spec's pids limit for the runner's processes and threads."""
    runner_max_restarts: int = Field(default=5, ge=0)
    """How often within a minute a crashed runner daemon is restarted; at the next crash
    the sandbox gives up and ends (the keeper, ``forgehand.runner.keeper_launch``)."""
    wall_time_grace_seconds: float = Field(default=2.0, ge=0)
    """Runs time out at the wall time; the watchdog kills everything this much later."""
    egress_ports: tuple[int, ...] = (80, 443)
    """Ports the proxy allows for ``allow_hosts``; empty means any port."""
    trusted_networks: tuple[IPv4Network | IPv6Network, ...] = ()
    """Passed to the egress proxy: internal mirrors' networks (see ``EgressConfig``)."""
    allow_loopback_for_tests: bool = False
    """TESTING ONLY: lets the egress proxy reach loopback servers."""

    @property
    def python(self) -> Path:
        """The interpreter that runs the runner inside the sandbox."""
        return self.venv / "bin" / "python"


class SandboxState(StrEnum):
    """Lifecycle of a ``BwrapRunnerSandbox``."""

    CREATED = "created"
    STARTING = "starting"
    READY = "ready"
    EXPIRED = "expired"
    """Its wall time ran out: every process was killed; only destroy remains."""
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    FAILED = "failed"
    """Start or destroy failed; ``forgehand sandbox gc`` removes what is left."""


class BwrapRunnerSandbox:
    """One started bubblewrap sandbox with its runner (the ``Sandbox`` Protocol)."""

    def __init__(
        self,
        spec: SandboxSpec,
        config: BwrapBackendConfig,
        *,
        resolver: Resolver | None = None,
        sandbox_id: str | None = None,
    ) -> None:
        self.spec = spec
        self.config = config
        self.state = SandboxState.CREATED
        self._id = sandbox_id or f"sbx-{uuid.uuid4().hex[:12]}"
        self._registry = Registry(config.state_dir)
        self._dir = self._registry.directory(self._id)
        self._resolver = resolver
        # The sandbox can write sock/: never follow what it puts there (sockets.py).
        self._client = RunnerClient.connect(
            PinnedSocketConnector(self._dir / "sock" / "runner.sock", Identity().host_uid)
        )
        self._box: BwrapSandbox | None = None
        self._proxy: EgressProxy | None = None
        self._userland: RunnerUserland | None = None
        self._layout_spec = spec
        self._root_shown = ""
        self._runner: asyncio.subprocess.Process | None = None
        self._achieved: Achieved | None = None
        self._work_made = False
        self._sock_mounted = False
        self._deadline = 0.0
        self._watchdog: asyncio.Task[None] | None = None
        self._ready_fd = -1

    # -- the Sandbox Protocol ----------------------------------------------------------

    @property
    def sandbox_id(self) -> str:
        return self._id

    @property
    def client(self) -> RunnerClient:
        return self._client

    @property
    def achieved(self) -> Achieved:
        if self._achieved is None:
            raise SandboxStateError(f"sandbox {self._id} is {self.state.value}: start it first")
        return self._achieved

    @property
    def work_dir(self) -> Path:
        return self.spec.work_dir.host_path

    # -- runs -----------------------------------------------------------------------------

    @property
    def run_env(self) -> dict[str, str]:
        """The environment runs should get: ``run_environment(spec)`` (proxy vars included)."""
        return run_environment(self.spec)

    @property
    def directory(self) -> Path:
        """The sandbox's host-side state directory."""
        return self._dir

    def run_spec(self, argv: tuple[str, ...] | list[str] = (), **fields: Any) -> RunSpec:
        """``runs.run_spec`` with the timeout capped at the sandbox's remaining wall time."""
        remaining = max(0.001, self._deadline - _now()) if self._deadline else None
        timeout = fields.pop("timeout_seconds", None)
        if remaining is not None:
            timeout = min(timeout, remaining) if timeout else remaining
        return run_spec(self.spec, argv, timeout_seconds=timeout, **fields)

    async def run(self, argv: tuple[str, ...] | list[str] = (), **fields: Any) -> RunResult:
        """Run a command to its end with the sandbox's defaults."""
        self._require(SandboxState.READY, "run in")
        return await self._client.run(self.run_spec(argv, **fields))

    async def member_pids(self) -> set[int]:
        """Host pids of every process in the sandbox (runner included)."""
        group = self._box.cgroup if self._box else None
        return await asyncio.to_thread(group.pids) if group else set()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Set everything up and return once the runner answers."""
        self._require(SandboxState.CREATED, "start")
        self.state = SandboxState.STARTING
        try:
            await self._launch()
        except BaseException:
            await _uncancellable(self._teardown_quietly())
            self.state = SandboxState.FAILED
            raise
        self.state = SandboxState.READY

    def restart_wall_clock(self) -> None:
        """Start (again) the wall time: the pool calls it when it hands the sandbox out."""
        self._deadline = _now() + self.spec.limits.wall_time_seconds
        if self._watchdog is not None:
            self._watchdog.cancel()
        delay = self.spec.limits.wall_time_seconds + self.config.wall_time_grace_seconds
        self._watchdog = asyncio.create_task(self._expire_after(delay))

    async def destroy(self) -> None:
        """Kill everything and remove every trace. Idempotent; survives cancellation."""
        if self.state in (SandboxState.DESTROYED, SandboxState.CREATED):
            return
        await _uncancellable(self._destroy())

    async def _destroy(self) -> None:
        self.state = SandboxState.DESTROYING
        failures = await self._teardown()
        if failures:
            self.state = SandboxState.FAILED
            raise SandboxError(
                f"sandbox {self._id} was not fully destroyed ({failures[0]}); "
                "run `forgehand sandbox gc` to remove what is left"
            ) from failures[0]
        self.state = SandboxState.DESTROYED

    async def _launch(self) -> None:
        check_isolation(self.spec)
        _check_network(self.spec)
        self._work_made = not await asyncio.to_thread(self.work_dir.exists)
        entry = own_entry(NAME, self._id, self.work_dir, self._work_made)
        await asyncio.to_thread(self._registry.add, entry)
        resolved = await images.as_dir_root(self.spec, self._dir)
        self._layout_spec, self._root_shown = resolved.spec, resolved.shown
        if isinstance(self._layout_spec.root, DirRoot):
            venv, source = self.config.venv, self.config.package_root
            self._userland = await asyncio.to_thread(runner_userland, venv, source)
        await self._make_sock_dir()
        if isinstance(self.spec.network, ProxyNetwork):
            await self._start_proxy(self.spec.network)
        await self._start_box()
        await self._spawn_runner()
        await self._wait_ready()
        await asyncio.to_thread(self._protect_daemon)
        if self._proxy is not None:
            await self._start_forwarder()
        self._achieved = await asyncio.to_thread(self._read_achieved)

    async def _make_sock_dir(self) -> None:
        """A tiny tmpfs: the sandbox can write there (its runner's socket), so it must not
        be able to fill the host's disk through it."""
        sock = self._dir / "sock"
        await asyncio.to_thread(sock.mkdir, 0o700)
        me = Identity()
        options = (
            f"size={SOCK_DIR_BYTES},nr_inodes=16,mode=0700,uid={me.host_uid},gid={me.host_gid}"
        )
        self._sock_mounted = True  # before: a start cancelled during `mount` may leave it
        await run_host(
            ["mount", "-t", "tmpfs", "-o", f"{options},nosuid,nodev,noexec", "tmpfs", str(sock)]
        )

    async def _start_proxy(self, network: ProxyNetwork) -> None:
        me = Identity()
        self._proxy = await rootfs.start_egress(
            self._dir, network, self.config, self._resolver, owner=(me.host_uid, me.host_gid)
        )

    async def _start_box(self) -> None:
        spec = self._layout_spec  # a root: image is a root: dir by now
        if self._proxy is not None and isinstance(spec.network, ProxyNetwork):
            network = spec.network.model_copy(update={"socket_path": self._proxy.socket_path})
            spec = spec.model_copy(update={"network": network})
        limits = spec.limits.model_copy(
            update={
                "memory_bytes": spec.limits.memory_bytes + self.config.runner_memory_bytes,
                "pids": spec.limits.pids + self.config.runner_pids,
            }
        )
        self._box = BwrapSandbox(
            spec.model_copy(update={"limits": limits}),
            self._id,
            extra_args=self._extra_args(),
            extra_host_paths=self._runtime_paths(),
        )
        await self._box.start()
        assert self._box.cgroup is not None
        events = self._box.cgroup.memory_events_file()
        self._box.extra_args += ("--ro-bind", str(events), MEMORY_EVENTS)

    def _runtime_paths(self) -> list[Path]:
        paths = [self.config.venv, self.config.package_root]
        return [p for p in paths if not PurePosixPath(p).is_relative_to("/usr")]

    def _extra_args(self) -> list[str]:
        args: list[str] = []
        if self._userland is not None:  # a custom root: the runner brings the host's userland
            for bind in self._userland.binds:
                args += ["--ro-bind", str(bind.source), str(bind.target)]
            args += ["--setenv", PYTHON_M_VARIABLE, json.dumps(self._userland.python_m())]
        else:
            for path in _outermost(self._runtime_paths()):
                args += ["--ro-bind", str(path), str(path)]
        args += ["--bind", str(self._dir / "sock"), SOCK_DIR]
        args += ["--size", str(self.config.runner_state_bytes), "--perms", "0700"]
        args += ["--tmpfs", RUNNER_STATE, "--setenv", "PYTHONDONTWRITEBYTECODE", "1"]
        if self._proxy is not None:
            args += ["--ro-bind", str(self._proxy.decision_log_path), EGRESS_LOG]
        return args

    async def _spawn_runner(self) -> None:
        assert self._box is not None
        missing = missing_keeper(self.config.package_root)
        if missing:
            raise SandboxLaunchError(f"sandbox {self._id}: {missing}")
        log = await asyncio.to_thread(_open_log, self._dir / "runner.log")
        ready_read, ready_write = os.pipe()
        argv = self._runner_argv(ready_write)
        try:
            self._runner = await self._box.spawn(
                argv,
                pass_fds=(ready_write,),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        except BaseException:
            os.close(ready_read)
            raise
        finally:
            os.close(log)
            os.close(ready_write)
        self._ready_fd = ready_read

    def _runner_argv(self, ready_fd: int) -> list[str]:
        """bwrap's command: the keeper, which starts the daemon (``rootfs.serve_argv``)."""
        package = SRC_TARGET if self._userland is not None else self.config.package_root
        return rootfs.serve_argv(
            self.spec,
            MEMORY_EVENTS,
            PurePosixPath(RUNNER_SOCKET),
            self._python_m(),
            keeper=PurePosixPath(package) / KEEPER_IN_PACKAGE,
            state_dir=PurePosixPath(RUNNER_STATE),
            max_restarts=self.config.runner_max_restarts,
            ready_fd=ready_fd,
        )

    async def _wait_ready(self) -> None:
        """Wait for the daemon's line on its ready pipe (no polling), then ask it."""
        deadline = _now() + self.config.ready_timeout_seconds
        fd, self._ready_fd = self._ready_fd, -1
        line = await self._read_ready_line(fd, deadline)
        if line.strip() != b"ready":
            await self._check_runner_alive(deadline)
            raise await self._launch_error("the runner closed its ready pipe without serving")
        try:
            async with asyncio.timeout(max(0.001, deadline - _now())):
                await self._client.capabilities()
        except (TimeoutError, runner_errors.RunnerError) as exc:
            raise await self._launch_error(
                f"the runner did not answer ({exc or 'timeout'})"
            ) from exc

    async def _read_ready_line(self, fd: int, deadline: float) -> bytes:
        """The ready pipe's first line; b"" if the runner exits first. The outer bwrap
        process ends with the daemon, and it (like bwrap's init) holds the pipe open, so
        its exit is the other way to know."""
        assert self._runner is not None
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        line_task = asyncio.ensure_future(reader.readline())
        exit_task = asyncio.ensure_future(self._runner.wait())
        try:
            done, _ = await asyncio.wait(
                (line_task, exit_task),
                timeout=max(0.001, deadline - _now()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            return line_task.result() if line_task in done else b""
        finally:
            for task in (line_task, exit_task):
                task.cancel()
            await asyncio.gather(line_task, exit_task, return_exceptions=True)
            transport.close()

    def _protect_daemon(self) -> None:
        """Make the OOM killer pick the work, not the runner daemon (its keeper, and so
        every run, keep the default score; a daemon the keeper restarts does too)."""
        assert self._box is not None
        assert self._box.cgroup is not None
        pids = self._box.cgroup.pids()
        keepers = {pid for pid in pids if _proc_text(pid, "comm").strip() == KEEPER_COMM}
        for pid in pids:
            # The keeper (bwrap's command, --supervise) started the daemon as its child.
            stat = _proc_text(pid, "stat")
            parent = stat.rpartition(")")[2].split()[1:2]
            if parent and int(parent[0]) in keepers and DAEMON_MARK in _proc_cmdline(pid):
                with contextlib.suppress(OSError):
                    Path(f"/proc/{pid}/oom_score_adj").write_text(str(DAEMON_OOM_SCORE_ADJ))

    async def _check_runner_alive(self, deadline: float) -> None:
        assert self._runner is not None
        if self._runner.returncode is not None:
            code = self._runner.returncode
            raise await self._launch_error(f"the runner exited with status {code}")
        if _now() > deadline:
            timeout = self.config.ready_timeout_seconds
            raise await self._launch_error(f"the runner was not listening after {timeout:g}s")

    async def _launch_error(self, what: str) -> SandboxLaunchError:
        tail = await asyncio.to_thread(_tail, self._dir / "runner.log")
        return SandboxLaunchError(
            f"sandbox {self._id}: {what}; runner stderr: {tail or '(empty)'}; check that "
            f"{self.config.python} can import forgehand inside the sandbox"
        )

    def _python_m(self, *module: str) -> list[str]:
        """``python -m [MODULE]`` inside the sandbox: the venv's, or the runner's own
        userland in a custom root."""
        if self._userland is not None:
            return [*self._userland.python_m(), *module]
        return [str(self.config.python), *RUNNER_PYTHON_FLAGS, "-m", *module]

    async def _start_forwarder(self) -> None:
        forwarder = self._python_m("forgehand.sandbox.egress.forwarder")
        spec = RunSpec(
            argv=(*forwarder, "--socket", EGRESS_SOCKET),
            env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
            cwd="/",
        )
        await self._client.start(spec, FORWARDER_RUN_ID)
        remaining = max(0.001, self.config.ready_timeout_seconds)
        try:
            async with asyncio.timeout(remaining):
                await self._await_listening()
        except TimeoutError as exc:
            raise await self._launch_error("the egress forwarder did not listen") from exc

    async def _await_listening(self) -> None:
        events = cast(AsyncGenerator[object, None], self._client.attach(FORWARDER_RUN_ID))
        seen = b""
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Output):
                    seen += event.data
                    if b"listening on" in seen:
                        return
                if isinstance(event, Exited):
                    break
        raise await self._launch_error(f"the egress forwarder exited: {seen[-500:]!r}")

    def _read_achieved(self) -> Achieved:
        assert self._box is not None
        assert self._box.cgroup is not None
        memory, pids, cores = self._box.cgroup.read_limits()
        real = {"memory_bytes": memory, "pids": pids, "cpu_cores": cores}
        limits = self.spec.limits.model_copy(update=real)
        network = self.spec.network
        if self._proxy is not None and isinstance(network, ProxyNetwork):
            network = network.model_copy(update={"socket_path": self._proxy.socket_path})
        real_limits = Limits.model_validate(limits.model_dump())
        return Achieved(NAME, "process", real_limits, network, self._root_shown)

    async def _expire_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.state is SandboxState.READY and self._box is not None:
            try:
                await self._box.kill_all()
            finally:
                self.state = SandboxState.EXPIRED

    async def _teardown_quietly(self) -> None:
        await self._teardown()

    async def _teardown(self) -> list[BaseException]:
        """Every cleanup step runs; the record goes last, and only if all else worked."""
        steps: list[Callable[[], Awaitable[None]]] = [
            self._stop_watchdog,
            self._client.close,
            self._close_box,
            self._unmount_sock_dir,
            self._release_image,
            self._stop_proxy,
            self._remove_work_dir,
        ]
        if self._ready_fd >= 0:
            os.close(self._ready_fd)
            self._ready_fd = -1
        failures: list[BaseException] = []
        for step in steps:
            try:
                await step()
            except Exception as exc:
                failures.append(exc)
        if not failures:
            await asyncio.to_thread(self._registry.remove, self._id)
        return failures

    async def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None

    async def _unmount_sock_dir(self) -> None:
        if self._sock_mounted:
            await rootfs.unmount_sock_dir(self._dir / "sock")
            self._sock_mounted = False

    async def _release_image(self) -> None:
        await asyncio.to_thread(images.release, self._dir)

    async def _close_box(self) -> None:
        if self._box is not None:
            await self._box.close()

    async def _stop_proxy(self) -> None:
        if self._proxy is not None:
            await self._proxy.stop()

    async def _remove_work_dir(self) -> None:
        if self._work_made:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(self.work_dir.rmdir)

    def _require(self, state: SandboxState, action: str) -> None:
        if self.state is not state:
            raise SandboxStateError(
                f"cannot {action} sandbox {self._id}: it is {self.state.value}, not "
                f"{state.value}" + (" (its wall time ran out)" if self.state == "expired" else "")
            )


class BwrapBackend:
    """Sandboxes from bubblewrap + cgroups + seccomp: process isolation, milliseconds."""

    name = NAME
    isolation: IsolationLevel = "process"

    def __init__(
        self, config: BwrapBackendConfig | None = None, *, resolver: Resolver | None = None
    ) -> None:
        self.config = config or BwrapBackendConfig()
        self.resolver = resolver
        self.registry = Registry(self.config.state_dir)
        self._bytecode_fresh = False

    def availability(self) -> Availability:
        try:
            _check_host(self.config)
        except SandboxError as exc:
            return Availability(NAME, False, "process", str(exc))
        detail = f"bubblewrap at {shutil.which('bwrap')}, cgroups {_cgroup_summary()}"
        return Availability(NAME, True, "process", detail)

    def create(
        self, spec: SandboxSpec
    ) -> contextlib.AbstractAsyncContextManager[BwrapRunnerSandbox]:
        """Start a sandbox; it is destroyed on every path out of the ``async with``."""
        return self._create(spec)

    @asynccontextmanager
    async def _create(self, spec: SandboxSpec) -> AsyncIterator[BwrapRunnerSandbox]:
        sandbox = await self.launch(spec)
        try:
            sandbox.restart_wall_clock()
            yield sandbox
        finally:
            await sandbox.destroy()

    async def launch(self, spec: SandboxSpec) -> BwrapRunnerSandbox:
        """A started sandbox the caller must ``destroy()`` (prefer ``create``)."""
        if not self._bytecode_fresh:
            self._bytecode_fresh = True
            await asyncio.to_thread(refresh_bytecode, self.config.package_root)
        sandbox = BwrapRunnerSandbox(spec, self.config, resolver=self.resolver)
        await sandbox.start()
        return sandbox

    async def list_sandboxes(self) -> list[SandboxRecord]:
        return await list_records(self.registry, NAME)

    async def reap(self) -> list[SandboxRecord]:
        return await reap_leftovers(
            self.registry, NAME, lambda entry: asyncio.to_thread(_reap_entry, self.registry, entry)
        )


def refresh_bytecode(package_root: Path) -> None:
    """Bring the package's bytecode caches up to date, once per backend.

    The sandbox's root is read-only, so a runner whose ``.pyc`` is missing or older than
    its source recompiles that module at every start (tens of ms for the large ones).
    Where the tree is not writable, or the host asked for no bytecode, nothing happens.
    """
    if not sys.dont_write_bytecode:
        compileall.compile_dir(str(package_root / "forgehand"), quiet=2)


def _reap_entry(registry: Registry, entry: Entry) -> None:
    """Kill and remove what a dead owner left: cgroup, work dir mount, state dir."""
    group = cgroups.CgroupGroup(
        f"{entry.sandbox_id}.{entry.owner_pid}-{entry.owner_start}",
        cgroups.detect_hierarchies(),
    )
    group.remove()
    sock = registry.directory(entry.sandbox_id) / "sock"
    if _is_mount_point(sock):
        subprocess.run(["umount", str(sock)], check=True, capture_output=True)
    work = Path(entry.work_dir)
    if _is_mount_point(work):
        subprocess.run(["umount", str(work)], check=True, capture_output=True)
    if entry.work_dir_made:
        with contextlib.suppress(FileNotFoundError):
            work.rmdir()
    images.release(registry.directory(entry.sandbox_id))
    registry.remove(entry.sandbox_id)


def _is_mount_point(path: Path) -> bool:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    return any(line.split()[1] == str(path) for line in mounts if line.strip())


def _check_network(spec: SandboxSpec) -> None:
    network = spec.network
    if isinstance(network, OpenNetwork) and not network.unsafe_allow_open_network:
        raise IsolationUnavailable(
            "network 'open' needs unsafe_allow_open_network: true; use 'proxy' instead"
        )


def _check_host(config: BwrapBackendConfig) -> None:
    find_bwrap()
    if os.geteuid() != 0:
        raise BackendUnavailable(
            "the bwrap backend needs root (cgroups, work dir tmpfs): run as root or choose "
            "backend=podman"
        )
    if shutil.which("setpriv") is None:
        raise BackendUnavailable("setpriv not found: install the `util-linux` package")
    seccomp.build_filter()
    cgroups.require_hierarchies(cgroups.detect_hierarchies())
    _check_interpreter(config)
    missing = missing_keeper(config.package_root)
    if missing:
        raise BackendUnavailable(missing)


def _check_interpreter(config: BwrapBackendConfig) -> None:
    python = config.python.resolve()
    mounted = [PurePosixPath("/usr"), PurePosixPath(config.venv)]
    if not any(PurePosixPath(python).is_relative_to(m) for m in mounted):
        raise BackendUnavailable(
            f"the runner's interpreter {python} lives outside /usr and the venv, so the "
            "sandbox cannot run it: build the venv on /usr/bin/python3"
        )


def _cgroup_summary() -> str:
    found = cgroups.detect_hierarchies()
    return ", ".join(f"{c.value} v{h.version}" for c, h in sorted(found.items()))


def _outermost(paths: list[Path]) -> list[Path]:
    """Drop paths inside another path of the list (a venv inside the source tree)."""
    pure = [PurePosixPath(p) for p in paths]
    keep = [p for p in pure if not any(p != q and p.is_relative_to(q) for q in pure)]
    return [Path(p) for p in dict.fromkeys(keep)]


def _open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()[-LOG_TAIL_BYTES:]
    except OSError:
        return ""
    return data.decode(errors="replace").strip()


def _now() -> float:
    return asyncio.get_running_loop().time()


async def _uncancellable(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to its end even if the caller is cancelled meanwhile (then re-raise)."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


register_backend(NAME, BwrapBackend)
