"""The podman backend: a rootful runc container from a local rootfs, running the runner.

    backend = PodmanBackend()
    async with backend.create(spec) as sandbox:          # isolation "container"
        result = await sandbox.run(["pytest", "-q"])

No image is pulled: the root is a per-sandbox directory (``forgehand.sandbox.rootfs``) or
the spec's ``root: dir``, passed with ``--rootfs`` and mounted read-only; /usr, the venv
and the forgehand source come in read-only. The container runs as uid 1000 with every
capability dropped, ``no-new-privileges``, no network (or only the egress proxy's socket)
and podman's memory (swap included), pids and CPU limits. The runner listens on
``/run/forgehand/sock/runner.sock``, in a tiny host tmpfs (``<state_dir>/<id>/sock``,
mode 0700, the sandbox user's) bind-mounted into the container, and the host connects to
it directly (``sockets.PinnedSocketConnector``: never through a symlink the sandbox put
there); no host-side ``podman exec`` stays around. The kernel's OOM killer ends the
process that used the memory; the runner reads the container's ``memory.oom_control`` /
``memory.events`` and reports that run's reason as ``oom``. If the runner itself dies,
``ended`` says why: the watcher holds a pidfd of the container's main process (no
``podman wait`` while it runs) and asks podman for the exit status once it is gone.
``podman run --detach`` runs under a ``subreaper`` of ours, which inherits conmon and
reaps it after ``podman rm`` (PID 1 does not reap orphans on every machine); ``destroy``
waits for it. Containers carry the name ``forgehand-<hex>`` and labels with the
owner's pid; ``reap`` removes those of dead owners. With ``network: proxy`` the egress
proxy's socket and (read-only) decision log are mounted as on every backend
(``rootfs.egress_mounts``); the container's network stays ``none``.

This machine needs ``--ulimit nofile=1024:1024 --ulimit nproc=N:N`` (podman cannot raise
rlimits here) and runc (crun refuses the hybrid cgroup layout).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from forgehand.runner import errors as runner_errors
from forgehand.runner.client import RunnerClient
from forgehand.runner.model import ExitReason, RunResult, RunSpec
from forgehand.sandbox import cgroups, images, procs, rootfs
from forgehand.sandbox.backend import (
    ISOLATION_RANK,
    Achieved,
    register_backend,
)
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

NAME = "podman"
LABEL = "forgehand.sandbox"
INSTALL_HINT = "run `apt-get install -y podman runc`"
MEMORY_EVENTS_V1 = "/sys/fs/cgroup/memory/memory.oom_control"
MEMORY_EVENTS_V2 = "/sys/fs/cgroup/memory.events"


class PodmanConfig(BaseModel):
    """Settings of the podman backend, read once when the backend is made."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    type: Literal["podman"] = "podman"
    """Backend discriminator."""
    podman: str = "podman"
    """The podman binary (a name on PATH or a path)."""
    runtime: str = "runc"
    """OCI runtime; crun works only where the cgroup layout is not hybrid v1/v2."""
    state_dir: Path = DEFAULT_ROOT
    """Host directory of the sandbox registry and each sandbox's rootfs and log."""
    nproc_rlimit: int = Field(default=4096, gt=0)
    """RLIMIT_NPROC of the container (podman cannot keep the host's here); it counts every
    process of uid 1000 on the host, so the pids cgroup (``limits.pids``) is the real bound."""
    ready_timeout_seconds: float = Field(default=30.0, gt=0)
    """How long ``create`` waits for the runner to answer."""
    runner_state_bytes: ByteSize = 256 << 20
    """Size of the tmpfs holding the runner's journals."""
    wall_time_grace_seconds: float = Field(default=2.0, ge=0)
    """Runs time out at the wall time; the container is killed this much later."""
    egress_ports: tuple[int, ...] = (80, 443)
    """Ports the egress proxy allows for ``allow_hosts``."""
    trusted_networks: tuple[IPv4Network | IPv6Network, ...] = ()
    """Passed to the egress proxy (see ``EgressConfig``)."""
    allow_loopback_for_tests: bool = False
    """TESTING ONLY: lets the egress proxy reach loopback servers."""
    reap_timeout_seconds: float = Field(default=10.0, gt=0)
    """How long destroy waits for conmon to be reaped after the container's removal."""


def check_host(config: PodmanConfig) -> str:
    """What the backend will use, or BackendUnavailable saying what to install (blocking)."""
    podman = shutil.which(config.podman)
    if podman is None:
        raise BackendUnavailable(f"podman not found: {INSTALL_HINT}")
    if shutil.which(config.runtime) is None:
        raise BackendUnavailable(
            f"OCI runtime {config.runtime} not found: run `apt-get install -y {config.runtime}`"
        )
    if Path(config.runtime).name == "crun" and hybrid_cgroups():
        raise BackendUnavailable(
            "crun refuses this machine's hybrid cgroup layout (v1 controllers mounted beside "
            "a v2 tree that has controllers): use runtime runc"
        )
    if os.geteuid() != 0:
        raise BackendUnavailable("the podman backend runs rootful podman: run as root")
    rootfs.RunnerInstall.current().check()
    try:
        done = subprocess.run([podman, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendUnavailable(f"podman does not run ({exc}): {INSTALL_HINT}") from exc
    return f"{done.stdout.strip()} with {config.runtime}"


def hybrid_cgroups(mounts: str | None = None) -> bool:
    """Whether cgroup v1 controllers are mounted beside a cgroup v2 tree that has
    controllers of its own (``/proc/self/mounts``, or ``mounts``): crun refuses that."""
    text = mounts if mounts is not None else Path("/proc/self/mounts").read_text()
    fields = [line.split() for line in text.splitlines()]
    v1 = any(len(f) >= 3 and f[2] == "cgroup" for f in fields)
    v2 = [Path(f[1]) for f in fields if len(f) >= 3 and f[2] == "cgroup2"]
    return v1 and any(_has_controllers(mount) for mount in v2)


def _has_controllers(mount: Path) -> bool:
    try:
        return bool((mount / "cgroup.controllers").read_text().split())
    except OSError:
        return False


def check_spec(spec: SandboxSpec) -> None:
    """Fail closed on what this backend cannot give."""
    if ISOLATION_RANK[spec.isolation] > ISOLATION_RANK["container"]:
        raise IsolationUnavailable(
            f"podman gives container isolation, the spec requires {spec.isolation!r}: "
            "choose backend=gvisor"
        )
    if not isinstance(spec.network, NoNetwork | ProxyNetwork):
        raise IsolationUnavailable(
            "the podman backend offers network 'none' or 'proxy', not 'open': use 'proxy'"
        )
    rootfs.check_work_path(spec)


def mount_points(spec: SandboxSpec) -> list[PurePosixPath]:
    """The paths the container mounts on besides the root's binds (``SandboxRoot``),
    which must exist in the read-only rootfs."""
    points = [PurePosixPath(spec.work_dir.sandbox_path), rootfs.RUN_DIR]
    points += [PurePosixPath(m.destination) for m in spec.ro_mounts]
    if isinstance(spec.network, ProxyNetwork):
        points.append(rootfs.EGRESS_SOCKET)
    return points


def limit_args(spec: SandboxSpec, nproc: int) -> list[str]:
    """Memory (swap included), pids, CPU, rlimits this machine accepts, sized tmpfs."""
    limits = spec.limits
    return [
        *("--memory", str(limits.memory_bytes), "--memory-swap", str(limits.memory_bytes)),
        *("--pids-limit", str(limits.pids), "--cpus", f"{limits.cpu_cores:g}"),
        *("--ulimit", "nofile=1024:1024", "--ulimit", f"nproc={nproc}:{nproc}"),
        *("--tmpfs", f"/tmp:rw,nosuid,nodev,size={limits.disk_bytes}"),
    ]


PODMAN_SECCOMP = Path("/usr/share/containers/seccomp.json")
# Taken out of every allow rule of podman's default profile, so its default action (EPERM)
# refuses them: new namespaces (a host-kernel attack surface, unlike in gVisor), tracing,
# and joining namespaces. clone stays allowed without namespace flags; clone3 answers
# ENOSYS so libc falls back to clone, whose flags a filter can see.
DENIED_SYSCALLS = frozenset({"unshare", "clone", "clone3", "ptrace", "setns"})
CLONE_NAMESPACE_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
ENOSYS = 38


def seccomp_profile(default: Path = PODMAN_SECCOMP) -> dict[str, Any]:
    """Podman's default seccomp profile, tightened as DENIED_SYSCALLS says."""
    try:
        profile: dict[str, Any] = json.loads(default.read_text())
    except (OSError, ValueError) as exc:
        raise BackendUnavailable(
            f"podman's default seccomp profile {default} is missing or unreadable ({exc}): "
            "reinstall the `containers-common` package"
        ) from None
    for rule in profile.get("syscalls", []):
        rule["names"] = [n for n in rule["names"] if n not in DENIED_SYSCALLS]
    profile["syscalls"] = [r for r in profile.get("syscalls", []) if r["names"]]
    profile["syscalls"] += [
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [
                {
                    "index": 0,
                    "value": CLONE_NAMESPACE_FLAGS,
                    "valueTwo": 0,
                    "op": "SCMP_CMP_MASKED_EQ",
                },
            ],
        },
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
    ]
    return profile


def security_args(seccomp: Path) -> list[str]:
    """Unprivileged user, no capabilities, no privilege gain, read-only root, and podman's
    seccomp profile without namespaces or ptrace."""
    user = f"{rootfs.SANDBOX_UID}:{rootfs.SANDBOX_GID}"
    return [
        *("--user", user, "--cap-drop", "all", "--security-opt", "no-new-privileges"),
        *("--security-opt", f"seccomp={seccomp}"),
        *("--read-only", "--read-only-tmpfs=false", "--network", "none", "--hostname", "sandbox"),
        "--no-hosts",
    ]


def volume_args(
    spec: SandboxSpec, egress: EgressProxy | None, root: rootfs.SandboxRoot
) -> list[str]:
    """Read-only system and runner mounts, the work dir, the egress socket and log."""
    pairs = [(bind.source, bind.target) for bind in root.binds]
    pairs += [(m.source, PurePosixPath(m.destination)) for m in spec.ro_mounts]
    args = [a for src, dst in pairs for a in ("--volume", f"{src}:{dst}:ro")]
    args += ["--volume", f"{spec.work_dir.host_path}:{spec.work_dir.sandbox_path}:rw"]
    for src, dst, writable in rootfs.egress_mounts(egress) if egress is not None else ():
        args += ["--volume", f"{src}:{dst}:{'rw' if writable else 'ro'}"]
    return args


def env_args(spec: SandboxSpec, root: rootfs.SandboxRoot) -> list[str]:
    return [a for k, v in root.runner_env(spec).items() for a in ("--env", f"{k}={v}")]


class PodmanSandbox(rootfs.ManagedSandbox):
    """One running podman container with its runner (the ``Sandbox`` Protocol)."""

    def __init__(
        self, spec: SandboxSpec, config: PodmanConfig, *, resolver: Resolver | None = None
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
        socket = self._sock_dir / rootfs.SHARED_SOCKET.name
        self._client = RunnerClient.connect(PinnedSocketConnector(socket, rootfs.SANDBOX_UID))
        self._proxy: EgressProxy | None = None
        self._sandbox_root: rootfs.SandboxRoot | None = None
        self._root_shown = ""
        self.image_podman = config.podman
        self._achieved: Achieved | None = None
        self._ended: SandboxEnd | None = None
        self._work_made = False
        self._work_mounted = False
        self._started = False
        self._expired = False
        self._watcher: asyncio.Task[None] | None = None
        self._reaper: asyncio.subprocess.Process | None = None

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
        """Why the container stopped on its own, or None while it runs."""
        return self._ended

    @property
    def directory(self) -> Path:
        """The sandbox's host-side state directory."""
        return self._dir

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

    async def member_pids(self) -> set[int]:
        """Every host process that exists because of this container: its subreaper, its
        conmon processes (the container's, and one per exec session if any) with all they
        hold (the runner, its keeper, runs), and any ``podman`` command this process is
        running for it."""
        container_id = await self._inspect("{{.Id}}")
        return await rootfs.blocking(self._member_pids, container_id)

    def _member_pids(self, container_id: str) -> set[int]:
        table = procs.snapshot()
        roots = procs.mentioning(container_id, table, "conmon")
        roots |= procs.children_mentioning(self._id, table)
        if self._reaper is not None:
            roots.add(self._reaper.pid)
        return procs.descendants(roots, table)

    async def _launch(self) -> None:
        check_spec(self.spec)
        await rootfs.blocking(check_host, self.config)
        self._work_made = not await rootfs.blocking(self.work_dir.exists)
        entry = own_entry(NAME, self._id, self.work_dir, self._work_made)
        await rootfs.blocking(self._registry.add, entry)
        resolved = await images.as_dir_root(self.spec, self._dir, self.config.podman)
        self._root_shown = resolved.shown
        self._sandbox_root = await rootfs.blocking(rootfs.SandboxRoot.for_spec, resolved.spec)
        await self._mount_sock()
        await self._mount_work()
        if isinstance(self.spec.network, ProxyNetwork):
            self._proxy = await rootfs.start_egress(
                self._dir, self.spec.network, self.config, self._resolver
            )
        made = self._root()
        root = await rootfs.blocking(
            rootfs.prepare_rootfs, self._dir / "rootfs", self.spec, mount_points(self.spec), made
        )
        profile = json.dumps(seccomp_profile())
        await rootfs.blocking((self._dir / "seccomp.json").write_text, profile)
        await self._run_container(root)
        await self._wait_ready()
        if self._proxy is not None:
            async with asyncio.timeout(self.config.ready_timeout_seconds):
                await rootfs.start_forwarder(self._client, self._root().python_m)
        self._achieved = await self._read_achieved()
        self._watcher = asyncio.create_task(self._watch())

    def _podman(self, *arguments: str) -> list[str]:
        return [self.config.podman, *arguments]

    def run_argv(self, root: Path) -> list[str]:
        """The ``podman run`` command line of this sandbox."""
        owner = os.getpid()
        labels = [f"{LABEL}={self._id}", f"forgehand.owner_pid={owner}"]
        return self._podman(
            *("run", "--detach", "--name", self._id, "--runtime", self.config.runtime),
            *(a for label in labels for a in ("--label", label)),
            *("--log-driver", "k8s-file", "--log-opt", f"path={self._dir / 'runner.log'}"),
            *security_args(self._dir / "seccomp.json"),
            *limit_args(self.spec, self.config.nproc_rlimit),
            *("--tmpfs", self._run_tmpfs()),
            *volume_args(self.spec, self._proxy, self._root()),
            *("--volume", f"{self._sock_dir}:{rootfs.SOCK_DIR}:rw"),
            *env_args(self.spec, self._root()),
            *("--workdir", "/", "--rootfs", str(root)),
            *rootfs.serve_argv(
                self.spec, _memory_events(), rootfs.SHARED_SOCKET, self._root().python_m
            ),
        )

    def _run_tmpfs(self) -> str:
        return f"{rootfs.RUN_DIR}:rw,nosuid,nodev,size={self.config.runner_state_bytes}"

    async def _run_container(self, root: Path) -> None:
        """``podman run --detach`` under our subreaper, which inherits the container's
        conmon once podman exits and reaps it after ``podman rm`` (see ``subreaper``)."""
        self._started = True
        log = self._dir / "podman.log"
        self._reaper = await rootfs.spawn_subreaper(self.run_argv(root), log)
        status = await rootfs.subreaper_status(self._reaper)
        if status != 0:
            text = await rootfs.blocking(rootfs.tail, log)
            what = "the subreaper failed" if status is None else f"status {status}"
            raise await self._launch_error(f"`podman run` failed ({what}): {text}")

    async def _wait_ready(self) -> None:
        deadline = _now() + self.config.ready_timeout_seconds
        log = self._dir / "runner.log"
        polls = 0
        while b"serving on" not in await rootfs.blocking(_read_bytes, log):
            polls += 1
            if _now() > deadline or (polls % 20 == 0 and not await self._running()):
                raise await self._launch_error("the runner did not start")
            await asyncio.sleep(0.01)
        try:
            async with asyncio.timeout(max(0.001, deadline - _now())):
                await self._client.capabilities()
        except (TimeoutError, runner_errors.RunnerError) as exc:
            error = await self._launch_error(f"the runner did not answer ({exc or 'timeout'})")
            raise error from exc

    async def _running(self) -> bool:
        state = await self._inspect("{{.State.Running}}")
        return state == "true"

    async def _inspect(self, template: str) -> str:
        argv = self._podman("inspect", "--type", "container", "--format", template, self._id)
        code, text = await rootfs.run_host(argv, check=False)
        return text if code == 0 else ""

    async def _launch_error(self, what: str) -> SandboxLaunchError:
        text = await rootfs.blocking(rootfs.tail, self._dir / "runner.log")
        return SandboxLaunchError(
            f"podman sandbox {self._id}: {what}; runner output: {text or '(empty)'}; check "
            f"that {rootfs.RUNNER_PYTHON} can import forgehand and that {self.config.runtime} "
            "is installed"
        )

    async def _read_achieved(self) -> Achieved:
        text = await self._inspect("{{json .HostConfig}}")
        host = json.loads(text)
        real = {
            "memory_bytes": host["Memory"],
            "pids": host["PidsLimit"],
            "cpu_cores": host["NanoCpus"] / 1e9,
        }
        limits = Limits.model_validate(self.spec.limits.model_dump() | real)
        network = self.spec.network
        if self._proxy is not None and isinstance(network, ProxyNetwork):
            network = network.model_copy(update={"socket_path": self._proxy.socket_path})
        return Achieved(NAME, "container", limits, network, self._root_shown)

    async def _watch(self) -> None:
        """Wait for the container to stop (or the wall time to pass) and record why."""
        waiter = asyncio.create_task(self._wait_stopped())
        try:
            delay = self.spec.limits.wall_time_seconds + self.config.wall_time_grace_seconds
            done, _ = await asyncio.wait({waiter}, timeout=delay)
            if not done:
                self._expired = True
                await rootfs.run_host(self._podman("kill", self._id), check=False)
                await waiter
        finally:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        _, status = waiter.result()
        self._ended = await self._end_reason(status)
        if self.state is SandboxState.READY:
            self.state = SandboxState.ENDED

    async def _wait_stopped(self) -> tuple[int, str]:
        """Watch the container's main process through a pidfd (no helper process while it
        runs), then ask ``podman wait`` for the exit status podman recorded. Without a
        pidfd (the container is gone already, or podman did not answer) ``podman wait``
        does the waiting itself."""
        pidfd = await self._main_pidfd()
        if pidfd is not None:
            try:
                await rootfs.wait_exit(pidfd)
            finally:
                os.close(pidfd)
        return await rootfs.run_host(self._podman("wait", self._id), check=False)

    async def _main_pidfd(self) -> int | None:
        """A pidfd of the container's main process (the runner), checked to be in the
        container's cgroup after it was opened."""
        text = await self._inspect("{{.Id}} {{.State.Pid}}")
        container_id, _, pid = text.partition(" ")
        if not (container_id and pid.isdigit()):
            return None
        belongs = functools.partial(_in_cgroup_of, container_id)
        return await rootfs.blocking(procs.pidfd_if, int(pid), belongs)

    async def _end_reason(self, status: str) -> SandboxEnd:
        if self._expired:
            wall = self.spec.limits.wall_time_seconds
            return SandboxEnd(ExitReason.TIMEOUT, f"the wall time of {wall:g}s ran out")
        if await self._inspect("{{.State.OOMKilled}}") == "true":
            limit = self.spec.limits.memory_bytes
            return SandboxEnd(ExitReason.OOM, f"the runner was killed at {limit} bytes of memory")
        return SandboxEnd(ExitReason.EXITED, f"the container stopped with status {status}")

    async def _teardown(self) -> list[BaseException]:
        """Every cleanup step runs; the record goes last, and only if all else worked."""
        steps: list[Callable[[], Awaitable[None]]] = [
            self._stop_watcher,
            self._client.close,
            # Even if the client was closed and then used again: its channel and the
            # pinned socket go before the socket's tmpfs is unmounted.
            self._client.transport.close,
            self._remove_container,
            self._await_reaper,
            self._release_image,
            self._unmount_sock,
            self._unmount_work,
            self._stop_proxy,
        ]
        return await self._cleanup(steps)

    async def _remove_container(self) -> None:
        if self._started:
            await remove_container(self.config, self._id)

    async def _await_reaper(self) -> None:
        """Once the container is removed, its subreaper has reaped conmon and exits."""
        reaper, self._reaper = self._reaper, None
        patience = self.config.reap_timeout_seconds
        await rootfs.await_subreaper(reaper, patience, f"podman sandbox {self._id}", "podman rm")

    async def _stop_proxy(self) -> None:
        if self._proxy is not None:
            await self._proxy.stop()


async def remove_container(config: PodmanConfig, name: str) -> None:
    """Kill and remove a container (and its cgroup); fine if it is already gone."""
    argv = [config.podman, "rm", "--force", "--time", "0", "--ignore", name]
    code, text = await rootfs.run_host(argv, check=False)
    if code != 0:
        raise SandboxError(f"`podman rm --force {name}` failed: {text[-1000:]}")


class PodmanBackend(rootfs.ManagedBackend[PodmanConfig, PodmanSandbox]):
    """Sandboxes as rootful podman containers (runc): isolation ``container``."""

    name = NAME
    isolation: IsolationLevel = "container"

    def _default_config(self) -> PodmanConfig:
        return PodmanConfig()

    def _check_host(self) -> str:
        return check_host(self.config)

    def _sandbox(self, spec: SandboxSpec) -> PodmanSandbox:
        return PodmanSandbox(spec, self.config, resolver=self.resolver)

    async def _reap_entry(self, entry: Entry) -> None:
        await reap_entry(self.config, self.registry, entry)


async def reap_entry(config: PodmanConfig, registry: Registry, entry: Entry) -> None:
    """Remove what a dead owner left: the container, the socket and work dir mounts, the
    state dir."""
    await remove_container(config, entry.sandbox_id)
    await rootfs.blocking(images.release, registry.directory(entry.sandbox_id), config.podman)
    await rootfs.unmount_sock_dir(registry.directory(entry.sandbox_id) / "sock")
    await rootfs.unmount_work_dir(Path(entry.work_dir), entry.work_dir_made)
    await rootfs.blocking(registry.remove, entry.sandbox_id)


def _in_cgroup_of(container_id: str, pid: int) -> bool:
    """Whether ``pid`` lives in the cgroup podman made for ``container_id``."""
    return container_id in Path(f"/proc/{pid}/cgroup").read_text()


def _memory_events() -> str:
    """Where the container sees its own cgroup's OOM counter."""
    memory = cgroups.detect_hierarchies().get(cgroups.Controller.MEMORY)
    return MEMORY_EVENTS_V2 if memory is not None and memory.version == 2 else MEMORY_EVENTS_V1


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _now() -> float:
    return asyncio.get_running_loop().time()


register_backend(NAME, PodmanBackend)
