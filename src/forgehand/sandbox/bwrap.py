"""The bubblewrap backend: namespaces, seccomp, a cgroup and a size-capped work dir.

``build_argv`` turns a ``SandboxSpec`` into a bwrap command line. ``BwrapSandbox`` is the
lifecycle around it::

    async with BwrapSandbox(spec) as sandbox:       # cgroup + work dir tmpfs
        result = await sandbox.run(["make", "test"])  # or sandbox.spawn(...)
    # every process killed, cgroup removed, work dir unmounted

How a command starts, race-free: a ``/bin/sh`` wrapper writes its own pid into the
group's ``cgroup.procs`` files, then (as root) ``setpriv`` drops to an unprivileged host
uid and execs bwrap. Nothing of the sandbox runs before it is inside the cgroup, and the
user namespace maps the sandbox user to that unprivileged uid, never to host root.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from forgehand.sandbox import seccomp
from forgehand.sandbox.cgroups import CgroupGroup
from forgehand.sandbox.errors import (
    BackendUnavailable,
    IsolationUnavailable,
    SandboxError,
    SandboxLaunchError,
    SandboxStateError,
)
from forgehand.sandbox.layout import HOST_TOP_DIRS, Bind, CustomRoot, Link, custom_root
from forgehand.sandbox.spec import DirRoot, ImageRoot, OpenNetwork, ProxyNetwork, SandboxSpec

PROVIDES_ISOLATION = frozenset({"process"})
JOIN_FAILED_EXIT = 125
EGRESS_SOCKET = "/run/forgehand/egress.sock"
# /etc pieces programs need; never the whole /etc (shadow, ssh keys, pip.conf, ...).
HOST_ETC = (
    "alternatives",
    "ca-certificates",
    "ca-certificates.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "protocols",
    "services",
    "ssl/certs",
    "ssl/openssl.cnf",
    "python3",
    "python3.11",
)
_JOIN_SCRIPT = f"""
while [ "$1" != -- ]; do echo $$ > "$1" || exit {JOIN_FAILED_EXIT}; shift; done
shift
exec "$@"
"""


@dataclass(frozen=True)
class Identity:
    """Who the sandbox runs as: ``uid`` inside, mapped to the unprivileged ``host_uid``."""

    uid: int = 1000
    gid: int = 1000
    user: str = "sandbox"
    host_uid: int = 65534
    host_gid: int = 65534


class SandboxState(StrEnum):
    """Lifecycle of a ``BwrapSandbox``."""

    CREATED = "created"
    STARTING = "starting"
    READY = "ready"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


class ExitReason(StrEnum):
    """Why a command ended."""

    EXITED = "exited"
    SIGNALLED = "signalled"
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"


@dataclass(frozen=True)
class CommandResult:
    """What a finished command left behind."""

    returncode: int
    reason: ExitReason
    stdout: bytes
    stderr: bytes
    truncated: bool


def find_bwrap() -> str:
    """The path of the bwrap binary, or BackendUnavailable saying how to get it."""
    path = shutil.which("bwrap")
    if path is None:
        raise BackendUnavailable(
            "bubblewrap not found: install the `bubblewrap` package or choose backend=gvisor"
        )
    return path


def check_isolation(spec: SandboxSpec) -> None:
    """Fail closed when the spec asks for more isolation than bubblewrap gives."""
    if spec.isolation not in PROVIDES_ISOLATION:
        raise IsolationUnavailable(
            f"bubblewrap gives process isolation, the spec requires {spec.isolation!r}: "
            "choose backend=gvisor (kernel) or backend=podman (container)"
        )


@dataclass
class DataFiles:
    """Small generated files handed to bwrap as memfds (``--ro-bind-data FD DEST``)."""

    fds: dict[str, int] = field(default_factory=dict)

    def add(self, dest: str, content: bytes) -> int:
        """Store ``content`` for ``dest`` and return the fd bwrap reads it from."""
        fd = os.memfd_create(f"forgehand{dest.replace('/', '-')}", 0)
        self.fds[dest] = fd
        os.write(fd, content)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def close(self) -> None:
        """Close our copies of the fds (the child keeps its own)."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def etc_files(spec: SandboxSpec, identity: Identity) -> dict[str, bytes]:
    """Generated /etc files: the sandbox user exists, the host's accounts do not."""
    home = spec.work_dir.sandbox_path
    me = identity
    return {
        "/etc/passwd": (
            f"{me.user}:x:{me.uid}:{me.gid}:forgehand sandbox:{home}:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ).encode(),
        "/etc/group": f"{me.user}:x:{me.gid}:\nnogroup:x:65534:\n".encode(),
        "/etc/hosts": b"127.0.0.1 localhost sandbox\n::1 localhost ip6-localhost\n",
        "/etc/hostname": b"sandbox\n",
    }


def default_env(spec: SandboxSpec, identity: Identity) -> dict[str, str]:
    """The environment: a few neutral defaults, then exactly what the spec names."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(spec.work_dir.sandbox_path),
        "USER": identity.user,
        "LOGNAME": identity.user,
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "PIP_CONFIG_FILE": "/dev/null",
    }
    if isinstance(spec.network, ProxyNetwork) and spec.network.socket_path is not None:
        env["FORGEHAND_EGRESS_SOCKET"] = EGRESS_SOCKET
    return {**env, **spec.env}


def build_argv(
    spec: SandboxSpec,
    command: Sequence[str],
    *,
    seccomp_fd: int,
    data_fds: Mapping[str, int],
    bwrap: str = "bwrap",
    identity: Identity = Identity(),
    extra: Sequence[str] = (),
    root: CustomRoot | None = None,
) -> list[str]:
    """The bwrap command line that runs ``command`` as ``spec`` describes.

    ``extra`` (more bwrap options, e.g. backend-private mounts) goes after the spec's mounts.
    ``root`` is what a ``root: dir`` brings (``layout.custom_root``, read by the caller).
    """
    if not command:
        raise SandboxLaunchError("empty command: pass the program and its arguments")
    return [
        bwrap,
        *_namespace_args(spec, identity),
        *_root_args(spec, root),
        *_data_args(data_fds),
        *_scratch_args(spec),
        *_mount_args(spec),
        *extra,
        # Last: the sandbox's own root (a tmpfs holding the mount points) becomes
        # read-only, so nothing but the work dir, /tmp and explicit mounts is writable.
        *("--remount-ro", "/"),
        *_env_args(default_env(spec, identity)),
        *("--seccomp", str(seccomp_fd)),
        *("--chdir", str(spec.work_dir.sandbox_path)),
        "--",
        *command,
    ]


def _namespace_args(spec: SandboxSpec, identity: Identity) -> list[str]:
    args = ["--unshare-user", "--uid", str(identity.uid), "--gid", str(identity.gid)]
    args += ["--disable-userns", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    args += ["--unshare-cgroup-try", "--hostname", "sandbox"]
    args += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
    if not isinstance(spec.network, OpenNetwork):
        args.append("--unshare-net")
    return args


def _root_args(spec: SandboxSpec, root: CustomRoot | None) -> list[str]:
    if isinstance(spec.root, ImageRoot):
        raise SandboxLaunchError(
            "a bare BwrapSandbox takes root: host or dir: mount the image first "
            "(images.as_dir_root), as the bwrap backend does"
        )
    if isinstance(spec.root, DirRoot):
        if root is None:
            raise SandboxLaunchError("a root: dir sandbox needs its layout.custom_root")
        args = [*_entry_args(root.binds), *_entry_args(root.links), *_entry_args(root.etc)]
        if isinstance(spec.network, OpenNetwork):  # the host's network, so its resolver
            args += ["--ro-bind-try", "/etc/resolv.conf", "/etc/resolv.conf"]
        return args
    args = ["--ro-bind", "/usr", "/usr"]
    for name in HOST_TOP_DIRS:
        host = Path("/") / name
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            args += ["--ro-bind", str(host), str(host)]
    for name in HOST_ETC:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    if isinstance(spec.network, OpenNetwork):
        args += ["--ro-bind-try", "/etc/resolv.conf", "/etc/resolv.conf"]
    return args


def _entry_args(entries: Sequence[Bind | Link]) -> list[str]:
    args: list[str] = []
    for entry in entries:
        if isinstance(entry, Link):
            args += ["--symlink", entry.to, str(entry.path)]
        else:
            args += ["--ro-bind", str(entry.source), str(entry.target)]
    return args


def _data_args(data_fds: Mapping[str, int]) -> list[str]:
    args: list[str] = []
    for dest, fd in data_fds.items():
        args += ["--perms", "0644", "--ro-bind-data", str(fd), dest]
    return args


def _scratch_args(spec: SandboxSpec) -> list[str]:
    return [
        *("--proc", "/proc", "--dev", "/dev"),
        *("--perms", "1777", "--size", str(spec.limits.disk_bytes), "--tmpfs", "/tmp"),
        *("--bind", str(spec.work_dir.host_path), str(spec.work_dir.sandbox_path)),
    ]


def _mount_args(spec: SandboxSpec) -> list[str]:
    args: list[str] = []
    for mount in spec.ro_mounts:
        args += ["--ro-bind", str(mount.source), str(mount.destination)]
    if isinstance(spec.network, ProxyNetwork) and spec.network.socket_path is not None:
        args += ["--bind", str(spec.network.socket_path), EGRESS_SOCKET]
    return args


def _env_args(env: Mapping[str, str]) -> list[str]:
    args: list[str] = []
    for name, value in env.items():
        args += ["--setenv", name, value]
    return args


def host_paths(spec: SandboxSpec) -> list[Path]:
    """Host paths bwrap opens as the unprivileged host uid."""
    paths = [spec.work_dir.host_path, *(m.source for m in spec.ro_mounts)]
    if isinstance(spec.root, DirRoot):
        paths.append(spec.root.path)
    if isinstance(spec.network, ProxyNetwork) and spec.network.socket_path is not None:
        paths.append(spec.network.socket_path)
    return paths


def check_reachable(path: Path, uid: int, gid: int) -> None:
    """Fail unless ``uid``/``gid`` may traverse every directory above ``path``."""
    for parent in reversed(path.parents):
        info = parent.stat()
        if not _may_search(info, uid, gid):
            raise SandboxLaunchError(
                f"{path} is not reachable for the sandbox's host uid {uid}: {parent} lacks "
                "search permission; move it under a world-searchable directory or chmod o+x"
            )


def _may_search(info: os.stat_result, uid: int, gid: int) -> bool:
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def _wrapper_argv(join_files: Sequence[Path], identity: Identity) -> list[str]:
    argv = ["/bin/sh", "-c", _JOIN_SCRIPT, "forgehand-join", *map(str, join_files), "--"]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise BackendUnavailable("setpriv not found: install the `util-linux` package")
        argv += [setpriv, f"--reuid={identity.host_uid}", f"--regid={identity.host_gid}"]
        argv += ["--clear-groups", "--"]
    return argv


class BwrapSandbox:
    """One bubblewrap sandbox: a cgroup and a work dir that outlive single commands."""

    def __init__(
        self,
        spec: SandboxSpec,
        sandbox_id: str | None = None,
        *,
        identity: Identity = Identity(),
        kill_grace: float = 5.0,
        extra_args: Sequence[str] = (),
        extra_host_paths: Sequence[Path] = (),
    ) -> None:
        self.spec = spec
        self.extra_args = tuple(extra_args)
        self.extra_host_paths = tuple(extra_host_paths)
        self.sandbox_id = sandbox_id or f"sbx-{uuid.uuid4().hex[:12]}"
        self.identity = identity
        self.kill_grace = kill_grace
        self.state = SandboxState.CREATED
        self.cgroup: CgroupGroup | None = None
        self._bwrap = ""
        self._filter = b""
        self.custom_root: CustomRoot | None = None
        self._work_mounted = False
        self._processes: list[asyncio.subprocess.Process] = []

    async def __aenter__(self) -> BwrapSandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Check the host, create the cgroup and mount the work dir."""
        self._require(SandboxState.CREATED, "start")
        self.state = SandboxState.STARTING
        try:
            await self._prepare()
        except BaseException:
            await self._teardown()
            self.state = SandboxState.FAILED
            raise
        self.state = SandboxState.READY

    async def _prepare(self) -> None:
        check_isolation(self.spec)
        await asyncio.to_thread(self._check_host)
        self.cgroup = await asyncio.to_thread(CgroupGroup.for_sandbox, self.sandbox_id)
        await asyncio.to_thread(self.cgroup.make)  # held first: a cancel here still removes it
        limits = self.spec.limits
        await asyncio.to_thread(
            self.cgroup.set_limits, limits.memory_bytes, limits.pids, limits.cpu_cores
        )
        await self._mount_work_dir()

    def _check_host(self) -> None:
        self._bwrap = find_bwrap()
        self._filter = seccomp.build_filter()
        if os.geteuid() != 0:
            raise BackendUnavailable(
                "the bwrap backend needs root to create cgroups and mount the work dir: "
                "run the service as root or choose backend=podman"
            )
        self._check_paths()
        self.custom_root = custom_root(self.spec)

    def _check_paths(self) -> None:
        self.spec.work_dir.host_path.mkdir(parents=True, exist_ok=True)
        for path in [*host_paths(self.spec), *self.extra_host_paths]:
            check_reachable(path, self.identity.host_uid, self.identity.host_gid)

    async def _mount_work_dir(self) -> None:
        me = self.identity
        options = f"size={self.spec.work_dir_bytes},mode=0755,uid={me.host_uid},gid={me.host_gid}"
        host = str(self.spec.work_dir.host_path)
        self._work_mounted = True  # before: a start cancelled during `mount` may leave it
        await run_host(["mount", "-t", "tmpfs", "-o", f"{options},nosuid,nodev", "tmpfs", host])

    async def spawn(
        self, command: Sequence[str], *, pass_fds: Sequence[int] = (), **kwargs: Any
    ) -> asyncio.subprocess.Process:
        """Start ``command`` in the sandbox; ``pass_fds`` stay open in it under the same
        numbers, other ``kwargs`` go to ``create_subprocess_exec``."""
        self._require(SandboxState.READY, "spawn")
        argv, files = await asyncio.to_thread(self._launch_plan, command)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, pass_fds=(*files.fds.values(), *pass_fds), env={}, **kwargs
            )
        finally:
            files.close()
        self._processes.append(process)
        return process

    def _launch_plan(self, command: Sequence[str]) -> tuple[list[str], DataFiles]:
        """The full argv (cgroup-joining wrapper + bwrap) and the fds it reads."""
        assert self.cgroup is not None
        files = self._data_files()
        try:
            wrapper = _wrapper_argv(self.cgroup.procs_files, self.identity)
            argv = build_argv(
                self.spec,
                command,
                seccomp_fd=files.fds["seccomp"],
                data_fds={dest: fd for dest, fd in files.fds.items() if dest != "seccomp"},
                bwrap=self._bwrap,
                identity=self.identity,
                extra=self.extra_args,
                root=self.custom_root,
            )
        except BaseException:
            files.close()
            raise
        return [*wrapper, *argv], files

    def _data_files(self) -> DataFiles:
        files = DataFiles()
        files.add("seccomp", self._filter)
        for dest, content in etc_files(self.spec, self.identity).items():
            files.add(dest, content)
        return files

    async def run(self, command: Sequence[str], stdin: bytes | None = None) -> CommandResult:
        """Run ``command`` to completion within the spec's wall time and output limits."""
        process = await self.spawn(
            command,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.cgroup is not None
        oom_before = await asyncio.to_thread(self.cgroup.oom_kills)
        collector = _OutputCollector(self.spec.limits.output_bytes)
        timed_out = await self._wait(process, collector, stdin)
        oom = await asyncio.to_thread(self.cgroup.oom_kills) > oom_before
        return collector.result(_returncode(process), _reason(process, timed_out, oom))

    async def _wait(
        self, process: asyncio.subprocess.Process, collector: _OutputCollector, stdin: bytes | None
    ) -> bool:
        work = asyncio.gather(collector.collect(process), process.wait(), _feed(process, stdin))
        try:
            await asyncio.wait_for(asyncio.shield(work), self.spec.limits.wall_time_seconds)
        except TimeoutError:
            await self.kill_all()
            await work
            return True
        return False

    async def kill_all(self) -> None:
        """SIGKILL every process in the sandbox's cgroup and wait until it is empty."""
        group = self.cgroup
        if group is None:
            return
        deadline = asyncio.get_running_loop().time() + self.kill_grace
        while await asyncio.to_thread(_signal_or_count, group):
            if asyncio.get_running_loop().time() > deadline:
                raise SandboxError(f"sandbox {self.sandbox_id}: processes survive SIGKILL")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Kill everything, remove the cgroup and unmount the work dir. Idempotent."""
        if self.state in (SandboxState.CLOSED, SandboxState.FAILED):
            return
        self.state = SandboxState.CLOSING
        try:
            await self._teardown()
        except BaseException:
            self.state = SandboxState.FAILED
            raise
        self.state = SandboxState.CLOSED

    async def _teardown(self) -> None:
        await self.kill_all()
        for process in self._processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        self._processes.clear()
        await self._remove_cgroup()
        if self._work_mounted:
            host = self.spec.work_dir.host_path
            if await asyncio.to_thread(os.path.ismount, host):  # our tmpfs: its own device
                await run_host(["umount", str(host)])
            self._work_mounted = False

    async def _remove_cgroup(self) -> None:
        group = self.cgroup
        if group is None:
            return
        deadline = asyncio.get_running_loop().time() + self.kill_grace
        while not await asyncio.to_thread(group.try_remove):
            if asyncio.get_running_loop().time() > deadline:
                raise SandboxError(f"cgroup of sandbox {self.sandbox_id} stays busy")
            await asyncio.sleep(0.01)
        self.cgroup = None

    def _require(self, state: SandboxState, action: str) -> None:
        if self.state is not state:
            raise SandboxStateError(
                f"cannot {action} sandbox {self.sandbox_id} in state {self.state.value}: "
                f"it must be {state.value}"
            )


class _OutputCollector:
    """Reads stdout and stderr, keeping at most ``limit`` bytes in total."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = 0
        self.truncated = False
        self.chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    async def collect(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        assert process.stderr is not None
        await asyncio.gather(
            self._drain(process.stdout, "stdout"), self._drain(process.stderr, "stderr")
        )

    async def _drain(self, stream: asyncio.StreamReader, name: str) -> None:
        while chunk := await stream.read(65536):
            room = max(0, self.limit - self.kept)
            self.truncated |= len(chunk) > room
            self.chunks[name].append(chunk[:room])
            self.kept += min(len(chunk), room)

    def result(self, returncode: int, reason: ExitReason) -> CommandResult:
        return CommandResult(
            returncode=returncode,
            reason=reason,
            stdout=b"".join(self.chunks["stdout"]),
            stderr=b"".join(self.chunks["stderr"]),
            truncated=self.truncated,
        )


def _signal_or_count(group: CgroupGroup) -> int:
    """SIGKILL the group's members; how many were signalled or are still listed."""
    return group.signal_members() or len(group.pids())


async def _feed(process: asyncio.subprocess.Process, data: bytes | None) -> None:
    if data is None or process.stdin is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        process.stdin.write(data)
        await process.stdin.drain()
    process.stdin.close()


def _returncode(process: asyncio.subprocess.Process) -> int:
    assert process.returncode is not None
    return process.returncode


def _reason(process: asyncio.subprocess.Process, timed_out: bool, oom: bool) -> ExitReason:
    if timed_out:
        return ExitReason.TIMEOUT
    if oom:
        return ExitReason.OUT_OF_MEMORY
    code = _returncode(process)
    # bwrap reports a command killed by signal N as exit status 128 + N.
    if code < 0 or code > 128:
        return ExitReason.SIGNALLED
    return ExitReason.EXITED


async def run_host(argv: list[str]) -> None:
    """Run a host command (mount, umount); SandboxLaunchError with its stderr on failure."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise SandboxLaunchError(
            f"{' '.join(argv)} failed: {stderr.decode(errors='replace').strip()}; "
            "check that the service runs as root and the path is not in use"
        )


async def run_in_sandbox(spec: SandboxSpec, command: Sequence[str]) -> CommandResult:
    """Create a sandbox, run one command in it, destroy the sandbox."""
    async with BwrapSandbox(spec) as sandbox:
        return await sandbox.run(command)
