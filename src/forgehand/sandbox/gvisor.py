"""The gVisor backend: ``runsc run`` of an OCI bundle whose one process is the runner.

    backend = GVisorBackend()
    async with backend.create(spec) as sandbox:          # isolation "kernel"
        result = await sandbox.run(["pytest", "-q"])
        sandbox.ended                                     # None, or why it ended (oom …)

**How the host reaches the runner.** Where runsc offers ``--host-uds=create`` (the
default, ``runner_channel: auto``; ``socket`` insists on it) the runner listens on
``/run/forgehand/sock/runner.sock`` (and its direct attach channel, ``….direct``), a
directory bind-mounted from ``<state_dir>/<id>/sock``: a tiny host tmpfs, mode 0700, fresh
per sandbox. runsc runs with ``--host-uds=create`` (``all`` with ``network: proxy``, whose
egress socket needs ``open``), so the gofer binds the runner's sockets on the host, owned
by the binding process's uid and gid (1000:1000). The host dials them through
``sockets.PinnedSocketConnector`` (``O_PATH|O_NOFOLLOW``, a socket of uid 1000 only), as
for podman; no host process stays per connection. Why that is safe:

- ``create`` lets the sandbox *bind* sockets in host-backed mounts it can write, nothing
  more: those are the socket dir and the work dir (a socket made there is a file the host
  never dials). It gives no ``connect`` to host sockets: that is ``open``, granted only
  with the egress proxy, and then only to sockets inside the sandbox's own mounts (its
  proxy's, its own, any in the spec's ``ro_mounts``). Nothing of another sandbox or of
  ``/run`` is mounted.
- The sandbox can swap its socket for a symlink to a host socket: the pin refuses it.
- The gofer serves bind mounts from its own mount namespace, where runsc leaves the
  ``ro`` ones writable, and in gVisor's source its bind request, unlike its other writes,
  does not check for a read-only mount: only the Sentry would stop a socket made in the host's
  ``/usr``. So each read-only source is bound through a view made read-only in the host
  kernel (``readonly_views``, under ``ro/``), and a compromised Sentry cannot do it
  either.
- The gofer keeps its own copy of each socket it binds, so a daemon that dies leaves a
  listener that accepts connections nobody serves. The keeper removes the dead daemon's
  socket files at once (``keeper.c``), gRPC gives a local socket 2 s to
  answer, and the direct channel's hello (``forgehand.runner.direct``) tells a served
  connection from a dead one: a client that redials too early retries instead of
  waiting for good.
- With ``runner_channel: exec``, and where runsc has no ``--host-uds=create`` (``auto``,
  with a log line), the host uses the exec channel instead: one ``runsc exec …
  forgehand-runner proxy`` per connection to the runner's socket, which then stays inside
  gVisor (``/run/forgehand/runner.sock``). It costs a host process (~8.5 MB) per open
  connection and ~100 ms per dial, and gives no direct channel.

Host side, under ``<state_dir>/<sandbox-id>/``: ``record.json`` (the registry),
``bundle/`` (config.json and the read-only rootfs, see ``forgehand.sandbox.rootfs``),
``ro/`` (the read-only views), ``sock/``, ``runner.log`` and, with ``network: proxy``,
``egress/`` (the proxy's socket, mounted at ``/opt/forgehand/egress.sock``, and its
decision log, mounted read-only at ``runs.EGRESS_LOG``; runsc runs with ``--network
none``).

``runsc run --detach`` daemonizes the sandbox and gofer processes; it runs under a
``subreaper`` of ours, which reaps them and gVisor's systrap stubs when the sandbox is
deleted (PID 1 does not reap orphans on every machine). ``destroy`` waits for it. The
watcher holds a pidfd of the sandbox process (no ``runsc wait`` while it runs).

Limits: the sandbox runs in our own cgroup ``forgehand/<id>.<owner>`` (runsc joins an
existing group and leaves its limits alone). gVisor ends the *whole* sandbox when the
group runs out of memory, and when its own threads hit the pids limit: ``ended`` then says
``oom`` or ``limit``. Since gVisor's threads and stub processes count, the host's pids
limit is the overhead measured once the runner is up plus ``pids_per_task`` per process
the workload may have. The work dir is a size-capped host tmpfs, /tmp a sized gVisor tmpfs.
Runs get the wall time as their timeout; the sandbox ends (``timeout``) a little later.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Mapping
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from forgehand.runner import errors as runner_errors
from forgehand.runner.client import RunnerClient
from forgehand.runner.model import ExitReason, RunResult, RunSpec
from forgehand.sandbox import cgroups, images, procs, readonly_views, rootfs
from forgehand.sandbox.backend import (
    ISOLATION_RANK,
    Achieved,
    register_backend,
)
from forgehand.sandbox.cgroups import CgroupGroup, Controller
from forgehand.sandbox.egress import EgressProxy, Resolver
from forgehand.sandbox.errors import (
    BackendUnavailable,
    IsolationUnavailable,
    SandboxError,
    SandboxLaunchError,
    SandboxStateError,
)
from forgehand.sandbox.registry import (
    DEFAULT_ROOT,
    Entry,
    Registry,
    own_entry,
)
from forgehand.sandbox.rootfs import SandboxEnd, SandboxState
from forgehand.sandbox.runs import run_environment, run_spec
from forgehand.sandbox.sockets import PinnedSocketConnector
from forgehand.sandbox.spec import (
    ByteSize,
    IsolationLevel,
    Limits,
    NoNetwork,
    ProxyNetwork,
    SandboxSpec,
)

log = logging.getLogger(__name__)
NAME = "gvisor"
DEFAULT_RUNSC_ROOT = Path("/run/forgehand/runsc")
FIRST_GOOD_RELEASE = 20230101
"""Debian 12's own runsc (release 20221219) fails even ``ls /`` on these machines."""
INSTALL_HINT = (
    "add `deb http://deb.debian.org/debian bookworm-backports main` to "
    "/etc/apt/sources.list.d/ and run `apt-get install -t bookworm-backports runsc`"
)
BOOT_PIDS = 256
VIEWS = "ro"
_RELEASE_RE = re.compile(r"(\d{8})")
# `runsc flags`: "  -host-uds value\n    \tcontrols … Values: none|open|create|all, …"
_HOST_UDS_RE = re.compile(r"^\s*-+host-uds\b[^\n]*\n[^\n]*?Values: ([a-z|]+)", re.MULTILINE)
Channel = Literal["socket", "exec"]


class GVisorConfig(BaseModel):
    """Settings of the gVisor backend, read once when the backend is made."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    type: Literal["gvisor"] = "gvisor"
    """Backend discriminator."""
    runsc: str = "runsc"
    """The runsc binary (a name on PATH or a path)."""
    platform: Literal["systrap", "ptrace"] = "systrap"
    """How gVisor intercepts syscalls; ``kvm`` is not offered (it hangs on nested VMs)."""
    state_dir: Path = DEFAULT_ROOT
    """Host directory of the sandbox registry and each sandbox's bundle and log."""
    runsc_root: Path = DEFAULT_RUNSC_ROOT
    """runsc's own state directory (``runsc --root``)."""
    ready_timeout_seconds: float = Field(default=60.0, gt=0)
    """How long ``create`` waits for the runner to answer."""
    runner_state_bytes: ByteSize = 256 << 20
    """Size of the tmpfs holding the runner's journals (counts against memory)."""
    pids_per_task: int = Field(default=3, ge=1)
    """Host pids gVisor needs per workload process or thread (systrap: about 2.5)."""
    wall_time_grace_seconds: float = Field(default=2.0, ge=0)
    """Runs time out at the wall time; the sandbox is ended this much later."""
    egress_ports: tuple[int, ...] = (80, 443)
    """Ports the egress proxy allows for ``allow_hosts``."""
    trusted_networks: tuple[IPv4Network | IPv6Network, ...] = ()
    """Passed to the egress proxy (see ``EgressConfig``)."""
    allow_loopback_for_tests: bool = False
    """TESTING ONLY: lets the egress proxy reach loopback servers."""
    reap_timeout_seconds: float = Field(default=10.0, gt=0)
    """How long destroy waits for the sandbox's processes to be reaped after deletion."""
    runner_channel: Literal["auto", "socket", "exec"] = "auto"
    """How the host reaches the runner: ``socket``, the runner's own unix socket in a
    per-sandbox host directory (needs runsc's ``--host-uds=create``); ``exec``, one ``runsc
    exec … forgehand-runner proxy`` per connection; ``auto`` (the default), the socket
    where runsc offers it, else the exec channel (with a log line)."""


def runsc_release(runsc: str) -> tuple[str, int | None]:
    """runsc's version line and its release date as YYYYMMDD (blocking)."""
    try:
        done = subprocess.run([runsc, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendUnavailable(f"runsc does not run ({exc}): {INSTALL_HINT}") from exc
    line = done.stdout.splitlines()[0] if done.stdout else done.stderr.strip()
    match = _RELEASE_RE.search(line)
    return line, int(match.group(1)) if match else None


def host_uds_modes(runsc: str) -> frozenset[str]:
    """The values runsc's ``--host-uds`` flag takes (none if it has no such flag) (blocking)."""
    try:
        info = os.stat(runsc)
    except OSError:
        return frozenset()
    return _host_uds_modes(runsc, info.st_ino, info.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _host_uds_modes(runsc: str, _inode: int, _mtime: int) -> frozenset[str]:
    try:
        done = subprocess.run([runsc, "flags"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    match = _HOST_UDS_RE.search(done.stdout + done.stderr)
    return frozenset(match.group(1).split("|")) if match else frozenset()


def choose_channel(config: GVisorConfig) -> Channel:
    """How the host will reach the runner (``GVisorConfig.runner_channel``) (blocking)."""
    runsc = shutil.which(config.runsc) or config.runsc
    if config.runner_channel == "exec":
        return "exec"
    if "create" in host_uds_modes(runsc):
        return "socket"
    if config.runner_channel == "socket":
        raise BackendUnavailable(
            f"{runsc} has no `--host-uds=create`, which the runner's socket needs: "
            f"{INSTALL_HINT}, or set runner_channel: exec"
        )
    return "exec"


def check_host(config: GVisorConfig) -> str:
    """What the backend will use, or BackendUnavailable saying what to install (blocking)."""
    path = shutil.which(config.runsc)
    if path is None:
        raise BackendUnavailable(f"runsc not found: {INSTALL_HINT}")
    line, release = runsc_release(path)
    if release is not None and release < FIRST_GOOD_RELEASE:
        raise BackendUnavailable(
            f"{path} is {line!r}, a release that fails even `ls /` here: {INSTALL_HINT}"
        )
    if os.geteuid() != 0:
        raise BackendUnavailable("the gvisor backend needs root (runsc, cgroups, work dir tmpfs)")
    cgroups.require_hierarchies(cgroups.detect_hierarchies())
    rootfs.RunnerInstall.current().check()
    channel = choose_channel(config)
    return f"{path} ({line}), platform {config.platform}, runner over {channel}"


def check_spec(spec: SandboxSpec) -> None:
    """Fail closed on what this backend cannot give."""
    if ISOLATION_RANK[spec.isolation] > ISOLATION_RANK["kernel"]:
        raise IsolationUnavailable(f"gvisor cannot give isolation {spec.isolation!r}")
    if not isinstance(spec.network, NoNetwork | ProxyNetwork):
        raise IsolationUnavailable(
            "the gvisor backend offers network 'none' or 'proxy', not 'open': use 'proxy' "
            "with an allowlist"
        )
    rootfs.check_work_path(spec)


def mount_points(spec: SandboxSpec) -> list[PurePosixPath]:
    """The paths the bundle mounts on besides the root's binds (``SandboxRoot``), which
    must exist in the read-only rootfs."""
    points = [PurePosixPath(spec.work_dir.sandbox_path)]
    points += [PurePosixPath(m.destination) for m in spec.ro_mounts]
    if isinstance(spec.network, ProxyNetwork):
        points.append(rootfs.EGRESS_SOCKET)
    return points


def read_only_sources(
    spec: SandboxSpec, egress: EgressProxy | None, root: rootfs.SandboxRoot
) -> list[Path]:
    """Every host path the bundle binds read-only, once each."""
    sources = [bind.source for bind in root.binds]
    sources += [m.source for m in spec.ro_mounts]
    if egress is not None:
        sources += [src for src, _, writable in rootfs.egress_mounts(egress) if not writable]
    return list(dict.fromkeys(sources))


def _bind(source: Path, target: PurePosixPath | Path, *, writable: bool = False) -> dict[str, Any]:
    options = ["rbind", "rw" if writable else "ro"]
    return {"destination": str(target), "type": "bind", "source": str(source), "options": options}


def _tmpfs(target: str, size: int, mode: str) -> dict[str, Any]:
    options = ["nosuid", "nodev", f"size={size}", f"mode={mode}"]
    return {"destination": target, "type": "tmpfs", "source": "tmpfs", "options": options}


def oci_mounts(
    spec: SandboxSpec,
    config: GVisorConfig,
    egress: EgressProxy | None,
    views: Mapping[Path, Path],
    sock_dir: Path | None,
    root: rootfs.SandboxRoot,
) -> list[dict[str, Any]]:
    """The bundle's mounts: system, runner, scratch, work dir, extra, egress and the
    runner's socket dir (``sock_dir``, the socket channel). Each read-only source is bound
    through its read-only view (``views``, see ``readonly_views``)."""
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        _tmpfs("/tmp", spec.limits.disk_bytes, "1777"),
        _tmpfs(str(rootfs.RUN_DIR.parent), config.runner_state_bytes, "1777"),
    ]
    mounts += [_bind(views[bind.source], bind.target) for bind in root.binds]
    mounts.append(_bind(spec.work_dir.host_path, spec.work_dir.sandbox_path, writable=True))
    mounts += [_bind(views[m.source], m.destination) for m in spec.ro_mounts]
    for src, dst, writable in rootfs.egress_mounts(egress) if egress is not None else ():
        mounts.append(_bind(src, dst, writable=True) if writable else _bind(views[src], dst))
    if sock_dir is not None:
        mounts.append(_bind(sock_dir, rootfs.SOCK_DIR, writable=True))
    return mounts


def oci_config(
    spec: SandboxSpec,
    config: GVisorConfig,
    cgroup_path: str,
    egress: EgressProxy | None,
    views: Mapping[Path, Path],
    root: rootfs.SandboxRoot,
    sock_dir: Path | None = None,
) -> dict[str, Any]:
    """The bundle's config.json: the runner as an unprivileged user, no capabilities. With
    ``sock_dir`` the runner listens there (the socket channel), else inside gVisor only."""
    env = root.runner_env(spec)
    socket = rootfs.RUNNER_SOCKET if sock_dir is None else rootfs.SHARED_SOCKET
    return {
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": rootfs.SANDBOX_UID, "gid": rootfs.SANDBOX_GID},
            "args": rootfs.serve_argv(spec, socket=socket, python_m=root.python_m),
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": "/",
            "capabilities": {k: [] for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "sandbox",
        "mounts": oci_mounts(spec, config, egress, views, sock_dir, root),
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "resources": {"memory": {"limit": spec.limits.memory_bytes}},
            "cgroupsPath": cgroup_path,
        },
    }


class GVisorSandbox(rootfs.ManagedSandbox):
    """One running gVisor sandbox with its runner (the ``Sandbox`` Protocol)."""

    def __init__(
        self, spec: SandboxSpec, config: GVisorConfig, *, resolver: Resolver | None = None
    ) -> None:
        self.spec = spec
        self.config = config
        self._resolver = resolver
        self.state = SandboxState.CREATED
        self._id = f"forgehand-{uuid.uuid4().hex[:12]}"
        self._registry = Registry(config.state_dir)
        self._dir = self._registry.directory(self._id)
        self._sock_dir = self._dir / "sock"
        self._sock_mounted = False
        self._views: dict[Path, Path] = {}
        self._sandbox_root: rootfs.SandboxRoot | None = None
        self._root_shown = ""
        self._channel: Channel = "exec" if config.runner_channel == "exec" else "socket"
        self._client = self._make_client()
        self._group: CgroupGroup | None = None
        self._proxy: EgressProxy | None = None
        self._achieved: Achieved | None = None
        self._ended: SandboxEnd | None = None
        self._work_made = False
        self._work_mounted = False
        self._started = False
        self._pids_events_before = 0
        self._oom_kills_told = 0  # the most oom_kills() has returned
        self._watcher: asyncio.Task[None] | None = None
        self._reaper: asyncio.subprocess.Process | None = None
        self._expired = False
        self.host_pids_max = 0
        """The host pids limit really set: gVisor's overhead + ``pids_per_task`` x pids."""

    # -- the Sandbox Protocol ------------------------------------------------------------

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

    # -- runs and status -----------------------------------------------------------------

    @property
    def ended(self) -> SandboxEnd | None:
        """Why the sandbox stopped on its own (oom, limit, timeout), or None while it runs."""
        return self._ended

    @property
    def directory(self) -> Path:
        """The sandbox's host-side state directory."""
        return self._dir

    @property
    def cgroup(self) -> CgroupGroup | None:
        """The host cgroup the whole sandbox (gVisor included) runs in."""
        return self._group

    @property
    def run_env(self) -> dict[str, str]:
        """The environment runs should get (``runs.run_environment``)."""
        return run_environment(self.spec)

    def run_spec(self, argv: tuple[str, ...] | list[str] = (), **fields: Any) -> RunSpec:
        """``runs.run_spec``: cwd, env, output cap and the wall time as timeout."""
        return run_spec(self.spec, argv, **fields)

    async def run(self, argv: tuple[str, ...] | list[str] = (), **fields: Any) -> RunResult:
        """Run a command to its end with the sandbox's defaults."""
        self._require(SandboxState.READY, "run in")
        return await self._client.run(self.run_spec(argv, **fields))

    @property
    def channel(self) -> Channel:
        """How the host reaches the runner: ``socket`` (pinned, direct attach) or ``exec``."""
        return self._channel

    async def member_pids(self) -> set[int]:
        """Every host process that exists because of this sandbox: the subreaper and what
        it holds (runsc's sandbox, gofer and systrap stub processes), and any runsc command
        this process is running for it (``runsc wait`` once it stopped; on the exec channel
        one ``runsc exec`` per open connection). On the socket channel an idle sandbox has
        no helper process of this one."""
        return await rootfs.blocking(self._member_pids)

    def _member_pids(self) -> set[int]:
        table = procs.snapshot()
        roots = procs.children_mentioning(self._id, table)
        if self._reaper is not None:
            roots.add(self._reaper.pid)
        return procs.descendants(roots, table)

    async def oom_kills(self) -> int:
        """How often the kernel's OOM killer struck in this sandbox's cgroup (``CountsOomKills``).
        It usually ends the whole sandbox (``ended.reason`` is ``oom``); when it picks a
        gVisor stub process instead, only the run that used the memory fails (status 1),
        and this is how to tell: the runner inside cannot read the host's cgroup."""
        group = self._group
        try:
            count = 0 if group is None else await rootfs.blocking(group.oom_kills)
        except OSError:  # the group went with the sandbox
            return self._oom_kills_told
        self._oom_kills_told = max(self._oom_kills_told, count)
        return count

    def _make_client(self) -> RunnerClient:
        if self._channel == "exec":
            root = self._sandbox_root
            python_m = root.python_m if root is not None else rootfs.VENV_PYTHON_M
            return rootfs.exec_client(self._exec_argv(rootfs.proxy_argv(python_m)))
        # The sandbox can write sock/ (its runner binds there): never follow what it puts
        # there. The gofer makes the socket file owned by the binding process's uid.
        socket = self._sock_dir / rootfs.SHARED_SOCKET.name
        return RunnerClient.connect(PinnedSocketConnector(socket, rootfs.SANDBOX_UID))

    async def _launch(self) -> None:
        check_spec(self.spec)
        await rootfs.blocking(check_host, self.config)
        channel = await rootfs.blocking(choose_channel, self.config)
        if channel != self._channel:
            log.warning(
                "%s has no --host-uds=create: gvisor sandbox %s reaches its runner through "
                "`runsc exec` (slower, a host process per connection)",
                self.config.runsc,
                self._id,
            )
            self._channel = channel
            self._client = self._make_client()
        self._work_made = not await rootfs.blocking(self.work_dir.exists)
        entry = own_entry(NAME, self._id, self.work_dir, self._work_made)
        await rootfs.blocking(self._registry.add, entry)
        resolved = await images.as_dir_root(self.spec, self._dir)
        self._root_shown = resolved.shown
        self._sandbox_root = await rootfs.blocking(rootfs.SandboxRoot.for_spec, resolved.spec)
        if self._channel == "exec" and self._sandbox_root.custom is not None:
            self._client = self._make_client()  # its proxy runs on the runner's userland
        await self._make_cgroup()
        if self._channel == "socket":
            await self._mount_sock()
        await self._mount_work()
        if isinstance(self.spec.network, ProxyNetwork):
            self._proxy = await rootfs.start_egress(
                self._dir, self.spec.network, self.config, self._resolver
            )
        await rootfs.blocking(self._make_views)
        await rootfs.blocking(self._write_bundle)
        await self._run_sandbox()
        await self._wait_ready()
        await rootfs.blocking(self._fit_pids_limit)
        if self._proxy is not None:
            async with asyncio.timeout(self.config.ready_timeout_seconds):
                await rootfs.start_forwarder(self._client, self._root().python_m)
        self._achieved = await rootfs.blocking(self._read_achieved)
        self._watcher = asyncio.create_task(self._watch())

    async def _make_cgroup(self) -> None:
        self._group = await rootfs.blocking(CgroupGroup.for_sandbox, self._id)
        await rootfs.blocking(self._group.make)  # held first: a cancel here still removes it
        limits = self.spec.limits
        boot_pids = BOOT_PIDS + self.config.pids_per_task * limits.pids
        await rootfs.blocking(
            self._group.set_limits, limits.memory_bytes, boot_pids, limits.cpu_cores
        )
        self._pids_events_before = await rootfs.blocking(_pids_events, self._group)

    def _make_views(self) -> None:
        """A read-only view of each read-only source under ``ro/``, for the bundle."""
        views = self._dir / VIEWS
        views.mkdir(mode=0o700)
        for index, source in enumerate(read_only_sources(self.spec, self._proxy, self._root())):
            self._views[source] = views / str(index)
            readonly_views.bind_read_only(source, views / str(index))

    def _write_bundle(self) -> None:
        assert self._group is not None
        bundle = self._dir / "bundle"
        bundle.mkdir(mode=0o711)
        root = self._root()
        rootfs.prepare_rootfs(bundle / "rootfs", self.spec, mount_points(self.spec), root)
        cgroup_path = f"/{cgroups.PARENT}/{self._group.name}"
        sock_dir = self._sock_dir if self._channel == "socket" else None
        config = oci_config(
            self.spec, self.config, cgroup_path, self._proxy, self._views, root, sock_dir
        )
        (bundle / "config.json").write_text(json.dumps(config, indent=1))

    def _runsc(self, *arguments: str) -> list[str]:
        base = [self.config.runsc, "--root", str(self.config.runsc_root)]
        base += ["--platform", self.config.platform, "--network", "none", "--overlay2", "none"]
        uds = host_uds(connect=self._proxy is not None, create=self._channel == "socket")
        if uds != "none":
            base.append(f"--host-uds={uds}")
        return [*base, *arguments]

    def _exec_argv(self, command: list[str]) -> list[str]:
        env = {k: v for k, v in rootfs.runner_env(self.spec).items() if k in ("PATH", "PYTHONPATH")}
        user = f"{rootfs.SANDBOX_UID}:{rootfs.SANDBOX_GID}"
        flags = ["--user", user, "--cwd", "/", *(f"--env={k}={v}" for k, v in env.items())]
        base = [self.config.runsc, "--root", str(self.config.runsc_root), "exec"]
        return [*base, *flags, self._id, *command]

    async def _run_sandbox(self) -> None:
        """``runsc run --detach`` under our subreaper, which stays the parent of the
        sandbox, gofer and stub processes and reaps them (see ``subreaper``)."""
        argv = self._runsc("run", "--detach", "--bundle", str(self._dir / "bundle"), self._id)
        self._reaper = await rootfs.spawn_subreaper(argv, self._dir / "runner.log")
        self._started = True
        status = await rootfs.subreaper_status(self._reaper)
        if status is None:
            raise await self._launch_error("the subreaper running `runsc run` failed")
        if status != 0:
            raise await self._launch_error(f"`runsc run` failed with status {status}")

    async def _wait_ready(self) -> None:
        deadline = _now() + self.config.ready_timeout_seconds
        log = self._dir / "runner.log"
        while b"serving on" not in await rootfs.blocking(_read_bytes, log):
            if _now() > deadline or not await self._running():
                raise await self._launch_error("the runner did not start")
            await asyncio.sleep(0.02)
        try:
            async with asyncio.timeout(max(0.001, deadline - _now())):
                await self._client.capabilities()
        except (TimeoutError, runner_errors.RunnerError) as exc:
            error = await self._launch_error(f"the runner did not answer ({exc or 'timeout'})")
            raise error from exc

    async def _running(self) -> bool:
        code, text = await rootfs.run_host(self._runsc_state(), check=False)
        return code == 0 and '"running"' in text

    def _runsc_state(self) -> list[str]:
        return [self.config.runsc, "--root", str(self.config.runsc_root), "state", self._id]

    async def _launch_error(self, what: str) -> SandboxLaunchError:
        text = await rootfs.blocking(rootfs.tail, self._dir / "runner.log")
        return SandboxLaunchError(
            f"gvisor sandbox {self._id}: {what}; runner/runsc output: {text or '(empty)'}; "
            f"check the runsc version (`runsc --version`, want bookworm-backports) and that "
            f"{rootfs.RUNNER_PYTHON} can import forgehand"
        )

    def _fit_pids_limit(self) -> None:
        """Host pids limit = gVisor's and the runner's own pids now + the workload's share."""
        assert self._group is not None
        pids_dir = self._group.dir(Controller.PIDS)
        overhead = int((pids_dir / "pids.current").read_text())
        self.host_pids_max = overhead + self.config.pids_per_task * self.spec.limits.pids
        (pids_dir / "pids.max").write_text(str(self.host_pids_max))

    def _read_achieved(self) -> Achieved:
        assert self._group is not None
        memory, _, cores = self._group.read_limits()
        real = {"memory_bytes": memory, "cpu_cores": cores}
        limits = Limits.model_validate(self.spec.limits.model_dump() | real)
        network = self.spec.network
        if self._proxy is not None and isinstance(network, ProxyNetwork):
            network = network.model_copy(update={"socket_path": self._proxy.socket_path})
        return Achieved(NAME, "kernel", limits, network, self._root_shown)

    async def _watch(self) -> None:
        """Wait for the sandbox to stop (or the wall time to pass) and record why."""
        waiter = asyncio.create_task(self._wait_stopped())
        try:
            delay = self.spec.limits.wall_time_seconds + self.config.wall_time_grace_seconds
            done, _ = await asyncio.wait({waiter}, timeout=delay)
            if not done:
                self._expired = True
                await rootfs.run_host(self._runsc_kill(), check=False)
                await waiter
        finally:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        _, output = waiter.result()
        self._ended = await rootfs.blocking(self._end_reason, output)
        if self.state is SandboxState.READY:
            self.state = SandboxState.ENDED

    async def _wait_stopped(self) -> tuple[int, str]:
        """Watch the sandbox process through a pidfd (no helper process while it runs),
        then ask ``runsc wait``, which returns at once for a stopped sandbox. Without a
        pidfd (the sandbox is gone already, or runsc did not answer) ``runsc wait`` does
        the waiting itself."""
        pidfd = await self._main_pidfd()
        if pidfd is not None:
            try:
                await rootfs.wait_exit(pidfd)
            finally:
                os.close(pidfd)
        return await rootfs.run_host(self._runsc_wait(), check=False)

    async def _main_pidfd(self) -> int | None:
        """A pidfd of runsc's sandbox process, checked to be in our cgroup once opened."""
        group = self._group
        code, text = await rootfs.run_host(self._runsc_state(), check=False)
        try:
            pid = int(json.loads(text)["pid"]) if code == 0 else 0
        except (ValueError, KeyError, TypeError):
            pid = 0
        if group is None or pid <= 0:
            return None
        return await rootfs.blocking(procs.pidfd_if, pid, lambda p: p in group.pids())

    def _runsc_wait(self) -> list[str]:
        return [self.config.runsc, "--root", str(self.config.runsc_root), "wait", self._id]

    def _runsc_kill(self) -> list[str]:
        return [self.config.runsc, "--root", str(self.config.runsc_root), "kill", self._id, "KILL"]

    def _end_reason(self, wait_output: str) -> SandboxEnd:
        assert self._group is not None
        if self._expired:
            wall = self.spec.limits.wall_time_seconds
            return SandboxEnd(ExitReason.TIMEOUT, f"the wall time of {wall:g}s ran out")
        # Kills already told to a caller ended one run, which the sandbox outlived.
        if self._group.oom_kills() > self._oom_kills_told:
            limit = self.spec.limits.memory_bytes
            return SandboxEnd(ExitReason.OOM, f"the sandbox used its {limit} bytes of memory")
        if _pids_events(self._group) > self._pids_events_before:
            return SandboxEnd(
                ExitReason.LIMIT, f"the sandbox hit its pids limit ({self.spec.limits.pids})"
            )
        return SandboxEnd(ExitReason.EXITED, f"the sandbox stopped: {wait_output[-500:]}")

    async def _teardown(self) -> list[BaseException]:
        """Every cleanup step runs; the record goes last, and only if all else worked."""
        steps: list[Callable[[], Awaitable[None]]] = [
            self._stop_watcher,
            self._client.close,
            # Even if the client was closed and then used again: its channel and the
            # pinned socket go before the socket's tmpfs is unmounted.
            self._client.transport.close,
            self._delete_sandbox,
            self._await_reaper,
            self._remove_cgroup,
            self._release_views,
            self._release_image,
            self._unmount_sock,
            self._unmount_work,
            self._stop_proxy,
        ]
        return await self._cleanup(steps)

    async def _delete_sandbox(self) -> None:
        if self._started:
            await delete_runsc(self.config, self._id)

    async def _await_reaper(self) -> None:
        """Once the sandbox is deleted, its subreaper has reaped everything and exits."""
        reaper, self._reaper = self._reaper, None
        patience = self.config.reap_timeout_seconds
        await rootfs.await_subreaper(reaper, patience, f"gvisor sandbox {self._id}", "runsc delete")

    async def _remove_cgroup(self) -> None:
        if self._group is not None:
            await rootfs.blocking(self._group.remove)
            self._group = None

    async def _release_views(self) -> None:
        if self._views:
            await rootfs.blocking(readonly_views.release_below, self._dir / VIEWS)
            self._views.clear()

    async def _stop_proxy(self) -> None:
        if self._proxy is not None:
            await self._proxy.stop()


async def delete_runsc(config: GVisorConfig, sandbox_id: str) -> None:
    """Delete a runsc container (killing it first); fine if it is already gone."""
    base = [config.runsc, "--root", str(config.runsc_root)]
    code, text = await rootfs.run_host([*base, "delete", "--force", sandbox_id], check=False)
    if code != 0 and "does not exist" not in text and "not found" not in text:
        raise SandboxError(f"`runsc delete --force {sandbox_id}` failed: {text[-1000:]}")


class GVisorBackend(rootfs.ManagedBackend[GVisorConfig, GVisorSandbox]):
    """Sandboxes in gVisor's user-space kernel: isolation ``kernel``."""

    name = NAME
    isolation: IsolationLevel = "kernel"

    def _default_config(self) -> GVisorConfig:
        return GVisorConfig()

    def _check_host(self) -> str:
        return check_host(self.config)

    def _sandbox(self, spec: SandboxSpec) -> GVisorSandbox:
        return GVisorSandbox(spec, self.config, resolver=self.resolver)

    async def _reap_entry(self, entry: Entry) -> None:
        await reap_entry(self.config, self.registry, entry)


async def reap_entry(config: GVisorConfig, registry: Registry, entry: Entry) -> None:
    """Remove what a dead owner left: runsc container, cgroup, socket and work dir mounts,
    state dir."""
    await delete_runsc(config, entry.sandbox_id)
    name = f"{entry.sandbox_id}.{entry.owner_pid}-{entry.owner_start}"
    group = CgroupGroup(name, cgroups.detect_hierarchies())
    await rootfs.blocking(group.remove)
    await rootfs.blocking(
        readonly_views.release_below, registry.directory(entry.sandbox_id) / VIEWS
    )
    await rootfs.blocking(images.release, registry.directory(entry.sandbox_id))
    await rootfs.unmount_sock_dir(registry.directory(entry.sandbox_id) / "sock")
    await rootfs.unmount_work_dir(Path(entry.work_dir), entry.work_dir_made)
    await rootfs.blocking(registry.remove, entry.sandbox_id)


def host_uds(*, connect: bool, create: bool) -> str:
    """runsc's ``--host-uds`` value: ``open`` lets the sandbox connect to host sockets in its
    host-backed mounts (the egress proxy's), ``create`` lets it bind sockets there that the
    host sees (the runner's); ``all`` is both."""
    return {(False, False): "none", (True, False): "open", (False, True): "create"}.get(
        (connect, create), "all"
    )


def _pids_events(group: CgroupGroup) -> int:
    """How often the group's pids limit refused a fork."""
    try:
        text = (group.dir(Controller.PIDS) / "pids.events").read_text()
    except OSError:
        return 0
    return sum(int(v) for k, _, v in (ln.partition(" ") for ln in text.splitlines()) if k == "max")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _now() -> float:
    return asyncio.get_running_loop().time()


register_backend(NAME, GVisorBackend)
