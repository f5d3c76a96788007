"""What a sandbox must look like: typed, strict, immutable.

A ``SandboxSpec`` is backend-neutral; each backend turns it into its own invocation and
fails closed when it cannot honour a field (for example the isolation level).
Invalid input raises ``pydantic.ValidationError`` whose message names the field.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST_RE = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
)
_IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$")
_RESERVED_TARGETS = (PurePosixPath("/proc"), PurePosixPath("/dev"), PurePosixPath("/sys"))
RUNNER_STATE_DIR = PurePosixPath("/run/forgehand")
"""The runner's socket and journals, in every sandbox."""
RUNNER_USERLAND_DIR = PurePosixPath("/opt/forgehand")
"""The runner's own userland, in a sandbox on a custom root (``forgehand.sandbox.layout``)."""


def _reserved_why(target: PurePosixPath, runner_dirs: tuple[PurePosixPath, ...]) -> str:
    """Why a read-only mount may not appear at ``target``; empty if it may."""
    if target == PurePosixPath("/"):
        return "is the sandbox's own /"
    if any(target.is_relative_to(r) for r in _RESERVED_TARGETS):
        return "is the sandbox's own /proc, /dev or /sys"
    for runner in runner_dirs:
        if target.is_relative_to(runner):
            return f"lies in the runner's {runner}"
        if runner.is_relative_to(target):
            return f"would cover the runner's {runner}"
    return ""


def parse_size(value: object) -> object:
    """Turn "512M", "1G", "1.5GiB" or "4096" into bytes (binary units); pass ints through."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string such as '512M'")
    if not isinstance(value, str):
        return value
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"cannot parse size {value!r}: use bytes or a suffix K, M, G or T")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def _absolute_clean(path: Path) -> Path:
    pure = PurePosixPath(path)
    if not pure.is_absolute():
        raise ValueError(f"{str(path)!r} must be an absolute path")
    if ".." in pure.parts:
        raise ValueError(f"{str(path)!r} must not contain '..'")
    return Path(pure)


ByteSize = Annotated[int, BeforeValidator(parse_size), Field(gt=0)]
AbsolutePath = Annotated[Path, AfterValidator(_absolute_clean)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class HostRoot(_Strict):
    """The host's own system directories (/usr and a few /etc files), mounted read-only."""

    type: Literal["host"] = "host"
    """Use the host's filesystem, read-only."""


class DirRoot(_Strict):
    """A root filesystem directory (an unpacked image): its entries make the sandbox's /,
    read-only; the runner brings its own interpreter (``forgehand.sandbox.layout``)."""

    type: Literal["dir"] = "dir"
    """Use a root filesystem directory."""
    path: AbsolutePath
    """Host path of the root filesystem directory."""

    @field_validator("path")
    @classmethod
    def _not_the_hosts(cls, path: Path) -> Path:
        if PurePosixPath(path) == PurePosixPath("/"):
            raise ValueError(
                "'/' is the host's own root, and as a root: dir it would show the host's "
                "/home, /var, /srv… to the sandbox: use root: host (only /usr and a few "
                "/etc files)"
            )
        return path


class ImageRoot(_Strict):
    """A container image already in this machine's podman store (never pulled), read-only
    (``forgehand.sandbox.images``)."""

    type: Literal["image"] = "image"
    """Use a local container image."""
    name: str
    """The image's name or id, as podman knows it: ``localhost/app:1``, ``debian:12``."""

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return image_name(name)


def image_name(name: str) -> str:
    """``name`` if it is a container image's name or id; ValueError saying why not."""
    if not _IMAGE_RE.match(name):
        raise ValueError(
            f"{name!r} is not an image name such as 'debian:12' or 'localhost/app:1' "
            "(letters, digits and . _ - / : @, not starting with - or .)"
        )
    return name


class WorkDir(_Strict):
    """The sandbox's writable work directory, visible from the host and size-capped."""

    host_path: AbsolutePath
    """Host directory on which a size-capped tmpfs is mounted for the sandbox's lifetime."""
    sandbox_path: AbsolutePath = Path("/work")
    """Where the work directory appears inside the sandbox."""
    size_bytes: ByteSize | None = None
    """Size cap of the work directory; defaults to ``limits.disk_bytes``."""


class ReadOnlyMount(_Strict):
    """A host path made visible read-only inside the sandbox."""

    source: AbsolutePath
    """Host path to mount."""
    target: AbsolutePath | None = None
    """Where it appears inside the sandbox; defaults to the same path as ``source``."""

    @model_validator(mode="after")
    def _not_reserved(self) -> ReadOnlyMount:
        self.check_destination((RUNNER_STATE_DIR,))
        return self

    def check_destination(self, runner_dirs: tuple[PurePosixPath, ...]) -> None:
        """ValueError if the mount would appear where the sandbox or its runner lives."""
        why = _reserved_why(PurePosixPath(self.destination), runner_dirs)
        if why:
            where = "target" if self.target is not None else "target (the source's path)"
            raise ValueError(f"{where} {str(self.destination)!r} {why}: choose another target")

    @property
    def destination(self) -> Path:
        """The path inside the sandbox."""
        return self.target if self.target is not None else self.source


class Limits(_Strict):
    """Resource limits; a breach ends the sandboxed command, never the host."""

    memory_bytes: ByteSize = 2 << 30
    """Memory (including swap where the kernel accounts it) for all processes together."""
    pids: int = Field(default=512, gt=0)
    """Maximum number of processes and threads at once."""
    cpu_cores: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """CPU bandwidth in cores (1.5 = one and a half cores)."""
    disk_bytes: ByteSize = 1 << 30
    """Size cap of the sandbox's /tmp, and the default size of the work directory."""
    wall_time_seconds: float = Field(default=3600.0, gt=0, allow_inf_nan=False)
    """Wall-clock time after which a command is killed."""
    output_bytes: ByteSize = 10 << 20
    """Output kept per command; past it the command's output is truncated."""


class NoNetwork(_Strict):
    """No network at all: only a loopback interface."""

    mode: Literal["none"] = "none"
    """No network."""


class ProxyNetwork(_Strict):
    """Egress only through a host-side proxy that enforces a domain allowlist."""

    mode: Literal["proxy"] = "proxy"
    """Egress through the allowlisting proxy."""
    allow_hosts: tuple[str, ...] = Field(min_length=1)
    """Host names the proxy lets through; ``*.example.org`` matches subdomains."""
    socket_path: AbsolutePath | None = None
    """Host path of the proxy's unix socket, mounted into the sandbox when set."""
    read_only_methods: bool = False
    """Let only GET, HEAD and OPTIONS through, over plain HTTP; CONNECT (https) is then
    refused too, because the proxy cannot see the methods sent inside a TLS tunnel."""

    @field_validator("allow_hosts")
    @classmethod
    def _valid_hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        for host in hosts:
            if not _HOST_RE.match(host):
                raise ValueError(f"{host!r} is not a lower-case host name or '*.' wildcard")
        return hosts


class OpenNetwork(_Strict):
    """The host's network, unfiltered. Unsafe: only with an explicit opt-in."""

    mode: Literal["open"] = "open"
    """Unfiltered network."""
    unsafe_allow_open_network: bool = Field(default=False, validate_default=True)
    """Must be true: confirms that unfiltered network access is intended."""

    @field_validator("unsafe_allow_open_network")
    @classmethod
    def _must_opt_in(cls, value: bool) -> bool:
        if not value:
            raise ValueError("mode 'open' needs unsafe_allow_open_network: true")
        return value


NetworkPolicy = Annotated[NoNetwork | ProxyNetwork | OpenNetwork, Field(discriminator="mode")]
IsolationLevel = Literal["process", "kernel", "container"]
RootFs = Annotated[HostRoot | DirRoot | ImageRoot, Field(discriminator="type")]


class SandboxSpec(_Strict):
    """Everything a backend needs to build one sandbox."""

    work_dir: WorkDir
    """The writable, size-capped work directory."""
    root: RootFs = HostRoot()
    """Root filesystem, read-only: the host's (default), a rootfs directory, or a local
    container image."""
    ro_mounts: tuple[ReadOnlyMount, ...] = ()
    """Extra host paths mounted read-only (interpreters, caches)."""
    env: dict[str, str] = Field(default_factory=dict)
    """The complete environment; nothing from the host leaks in unless named here."""
    limits: Limits = Limits()
    """Resource limits."""
    network: NetworkPolicy = NoNetwork()
    """Network policy: none (default), proxy with an allowlist, or open (unsafe)."""
    isolation: IsolationLevel = "process"
    """Isolation the caller requires; a backend that cannot give it refuses the spec."""

    @field_validator("env")
    @classmethod
    def _valid_env(cls, env: dict[str, str]) -> dict[str, str]:
        for name, value in env.items():
            if not _ENV_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
            if "\0" in value:
                raise ValueError(f"the value of {name!r} contains a NUL byte")
        return env

    @model_validator(mode="after")
    def _mounts_leave_the_runner_and_the_work_dir(self) -> SandboxSpec:
        work = PurePosixPath(self.work_dir.sandbox_path)
        for mount in self.ro_mounts:
            if not isinstance(self.root, HostRoot):
                mount.check_destination((RUNNER_STATE_DIR, RUNNER_USERLAND_DIR))
            if work.is_relative_to(mount.destination):
                raise ValueError(
                    f"ro_mounts: {str(mount.destination)!r} would cover the work dir "
                    f"{str(work)!r}: choose another target"
                )
        return self

    @model_validator(mode="after")
    def _work_dir_fits_disk(self) -> SandboxSpec:
        size = self.work_dir.size_bytes
        if size is not None and size > self.limits.disk_bytes:
            raise ValueError("work_dir.size_bytes must not exceed limits.disk_bytes")
        return self

    @property
    def work_dir_bytes(self) -> int:
        """The effective size cap of the work directory."""
        return self.work_dir.size_bytes or self.limits.disk_bytes
