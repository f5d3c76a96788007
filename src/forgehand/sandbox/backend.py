"""The sandbox seam: one small Protocol, one module per backend.

    async with backend.create(spec) as sandbox:
        result = await sandbox.client.run(RunSpec(argv=("pytest",), cwd="/work"))

Every sandbox runs ``forgehand-runner`` inside; the host reaches it only through the
runner protocol (``sandbox.client``). ``sandbox.achieved`` says what the backend really
gave — never less than the spec asked for: a backend that cannot give the requested
isolation level, limit or network policy refuses in ``create`` with ``IsolationUnavailable``
(fail closed). ``destroy`` happens on every path out of the ``async with``; ``reap`` finds
what a crash left behind.

Backends register themselves in ``BACKENDS`` by name (``bwrap``, ``gvisor``, ``podman``);
``choose_backend`` picks the named one or the first available one that gives the level.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from forgehand.runner.client import RunnerClient
from forgehand.sandbox.errors import IsolationUnavailable
from forgehand.sandbox.spec import IsolationLevel, Limits, NetworkPolicy, SandboxSpec

if TYPE_CHECKING:
    from forgehand.sandbox.rootfs import SandboxEnd

# Stronger levels satisfy weaker requests: a container or user-space kernel also isolates
# processes. `kernel` (gVisor) is the strongest available here.
ISOLATION_RANK: dict[str, int] = {"process": 1, "container": 2, "kernel": 3}


@dataclass(frozen=True)
class Achieved:
    """What a sandbox really has (reported, not requested)."""

    backend: str
    isolation: IsolationLevel
    limits: Limits
    network: NetworkPolicy
    root: str
    """The root filesystem, exactly: ``host``, ``dir /abs/path``, or ``image NAME
    (sha256:<12 hex of the ID>)`` for the image really mounted."""


@dataclass(frozen=True)
class Availability:
    """Whether a backend works on this machine, and if not, why and what to do."""

    backend: str
    available: bool
    isolation: IsolationLevel
    detail: str


@dataclass(frozen=True)
class SandboxRecord:
    """A sandbox found on this machine (by ``forgehand sandbox ls`` or the reaper)."""

    backend: str
    sandbox_id: str
    state: Literal["running", "leftover"]
    owner_pid: int
    detail: str = ""


class Sandbox(Protocol):
    @property
    def sandbox_id(self) -> str: ...

    @property
    def client(self) -> RunnerClient: ...

    @property
    def achieved(self) -> Achieved: ...

    @property
    def work_dir(self) -> Path:
        """The work dir as the host sees it."""


@runtime_checkable
class EndsOnItsOwn(Protocol):
    """A sandbox that can stop before it is destroyed, taking its runner with it: gVisor
    ends the whole sandbox when it runs out of memory or pids, a container when its init
    dies. Its runner's client then only sees the connection fail; this says why."""

    async def wait_ended(self) -> SandboxEnd:
        """Wait until the sandbox stops on its own; why it did."""
        ...


@runtime_checkable
class CountsOomKills(Protocol):
    """A sandbox whose runner cannot see the OOM killer strike (gVisor: the killer picks
    a stub process of the Sentry, and the run only exits 1); the host can. Its runs'
    consumers compare the count before and after a run that failed."""

    async def oom_kills(self) -> int:
        """How often the kernel's OOM killer struck in the sandbox's cgroup so far."""
        ...


class SandboxBackend(Protocol):
    name: str
    isolation: IsolationLevel

    def availability(self) -> Availability: ...

    def create(self, spec: SandboxSpec) -> AbstractAsyncContextManager[Sandbox]: ...

    async def list_sandboxes(self) -> list[SandboxRecord]: ...

    async def reap(self) -> list[SandboxRecord]:
        """Destroy leftovers of crashed owners; return what was removed."""


BackendFactory = Callable[[], SandboxBackend]
BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    BACKENDS[name] = factory


def satisfies(given: IsolationLevel, wanted: IsolationLevel) -> bool:
    return ISOLATION_RANK[given] >= ISOLATION_RANK[wanted]


def choose_backend(spec: SandboxSpec, name: str | None = None) -> SandboxBackend:
    """The named backend, or the first available one that gives the spec's isolation.

    Raises IsolationUnavailable (never falls back to less isolation)."""
    _load_builtin_backends()
    if name is not None:
        return _named(name, spec)
    reasons = []
    for candidate in BACKENDS:
        backend = BACKENDS[candidate]()
        status = backend.availability()
        if status.available and satisfies(backend.isolation, spec.isolation):
            return backend
        reasons.append(f"{candidate}: {status.detail}")
    raise IsolationUnavailable(
        f"no sandbox backend here gives isolation level {spec.isolation!r}; " + "; ".join(reasons)
    )


def _named(name: str, spec: SandboxSpec) -> SandboxBackend:
    factory = BACKENDS.get(name)
    if factory is None:
        raise IsolationUnavailable(
            f"unknown sandbox backend {name!r}; known: {', '.join(sorted(BACKENDS))}"
        )
    backend = factory()
    status = backend.availability()
    if not status.available:
        raise IsolationUnavailable(f"sandbox backend {name} is unavailable: {status.detail}")
    if not satisfies(backend.isolation, spec.isolation):
        raise IsolationUnavailable(
            f"sandbox backend {name} gives isolation {backend.isolation!r}, weaker than the "
            f"{spec.isolation!r} asked for: choose a backend that gives it"
        )
    return backend


def load_backends() -> dict[str, BackendFactory]:
    """Every registered backend, after importing the built-in backend modules that exist."""
    _load_builtin_backends()
    return dict(BACKENDS)


def _load_builtin_backends() -> None:
    """Import the backend modules so they register (each is optional)."""
    import importlib

    for module in ("bwrap_backend", "gvisor", "podman"):
        try:
            importlib.import_module(f"forgehand.sandbox.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"forgehand.sandbox.{module}":
                raise
