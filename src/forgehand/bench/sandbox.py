"""``forgehand bench sandbox``: what a sandbox costs, per available backend.

Measured in one run, next to the host's own plain spawn of ``true``:

- ``start_ms``: a warm pool hands out a started sandbox → ``true`` has run through its
  runner (the Exited event is its first output). ``cold_start_ms``: the same from
  ``create`` (bwrap, cgroup, runner start and readiness included). p50 and p99.
- ``idle_pss_mb``: PSS (``/proc/<pid>/smaps_rollup``) summed over every host process
  that exists because of one idle sandbox (``member_pids``), runner included: bwrap its
  cgroup; gVisor the subreaper, runsc's sandbox, gofer and stub processes (and the host's
  ``runsc exec`` channels where runsc lacks ``--host-uds=create``); podman the subreaper,
  conmon and the container's processes (no host-side podman process stays). Processes
  that share one address space (gVisor's stubs) count once. Read a second after the
  sandbox's run (``IDLE_SETTLE_SECONDS``), on a sandbox from the warm pool, while the pool
  holds ``pool_size`` more: pages of shared files (libpython, gRPC's library) are split
  among every process that maps them, the others' runners included, as on a host that
  keeps sandboxes warm. Null when the backend cannot list the processes.
- ``idle_pss_alone_mb``: the same, of a sandbox with no other sandbox running (the first
  cold start's): it carries a bigger share of those file pages.
- ``density``: idle sandboxes of the default backend started four at a time until 30 s,
  16 GiB of PSS or ``density_max``; how many, how long, and their total PSS.

Every sandbox is destroyed before the function returns.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from forgehand.runner.model import RunSpec
from forgehand.sandbox import procs
from forgehand.sandbox.backend import Sandbox, SandboxBackend, choose_backend, load_backends
from forgehand.sandbox.errors import SandboxError
from forgehand.sandbox.pool import SandboxPool
from forgehand.sandbox.spec import SandboxSpec

WORK_ROOT = Path("/run/forgehand/work")
DENSITY_SECONDS = 30.0
DENSITY_BYTES = 16 << 30
MIB = 1 << 20
IDLE_SETTLE_SECONDS = 1.0
"""How long a sandbox sits after its run before its idle memory is read: host helpers of
its start (``podman`` commands, runtime processes) have ended by then."""
TRUE = RunSpec(argv=("true",), env={"PATH": "/usr/bin:/bin"})


@runtime_checkable
class ListsProcesses(Protocol):
    """A sandbox that can name its host pids (bwrap: its cgroup's members)."""

    async def member_pids(self) -> set[int]: ...


@dataclass(frozen=True)
class BenchOptions:
    """How much to measure; the defaults are the published numbers' settings."""

    runs: int = 20
    density_max: int = 100
    density_seconds: float = DENSITY_SECONDS
    pool_size: int = 2
    density_concurrency: int = 4
    """Sandboxes the density test starts at once (2 cores: starts overlap host waits)."""
    backends: tuple[str, ...] = ()
    """Only these backends (empty: every available one); density uses the first."""


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 and p99 (nearest rank) of ``samples``, rounded to 0.01."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]
    return {"p50": round(statistics.median(ordered), 2), "p99": round(p99, 2)}


def pss_bytes(pids: set[int]) -> int:
    """Summed PSS of the distinct address spaces of ``pids``; processes that vanished
    count 0."""
    total = 0
    for pid in procs.address_spaces(pids):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return total


async def sandbox_pss(sandbox: Sandbox) -> int | None:
    """The sandbox's PSS in bytes, or None if its backend cannot list its processes."""
    if not isinstance(sandbox, ListsProcesses):
        return None
    pids = await sandbox.member_pids()
    return await asyncio.to_thread(pss_bytes, pids)


async def idle_pss(sandbox: Sandbox) -> int | None:
    """``sandbox_pss`` once the sandbox has sat idle for ``IDLE_SETTLE_SECONDS``."""
    await asyncio.sleep(IDLE_SETTLE_SECONDS)
    return await sandbox_pss(sandbox)


def _mb(size: int | None) -> float | None:
    return None if size is None else round(size / MIB, 1)


def bench_spec(work_dir: Path) -> SandboxSpec:
    """The spec every benchmarked sandbox uses (small limits, no network)."""
    return SandboxSpec.model_validate(
        {
            "work_dir": {"host_path": str(work_dir), "size_bytes": "64M"},
            "limits": {"memory_bytes": "512M", "pids": 128, "disk_bytes": "256M"},
        }
    )


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


async def host_spawn_ms(runs: int) -> list[float]:
    """The host's plain spawn and wait of ``true``."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec("true")
        await process.wait()
        samples.append(_ms_since(started))
    return samples


async def cold_start_ms(
    backend: SandboxBackend, work_root: Path, runs: int
) -> tuple[list[float], int | None]:
    """``create`` → ``true`` has run through the runner; destroy is not counted. Also the
    PSS of the first sandbox, measured after its sample, while it is the only one."""
    samples = []
    alone: int | None = None
    for _ in range(runs):
        spec = bench_spec(work_root / uuid.uuid4().hex[:12])
        started = time.perf_counter()
        async with backend.create(spec) as sandbox:
            await sandbox.client.run(TRUE)
            samples.append(_ms_since(started))
            if len(samples) == 1:
                alone = await idle_pss(sandbox)
    return samples, alone


async def warm_start_ms(
    backend: SandboxBackend, work_root: Path, options: BenchOptions
) -> tuple[list[float], int | None]:
    """Warm-pool start samples (the pool is full before each), and one sandbox's PSS."""
    samples: list[float] = []
    idle: int | None = None
    async with SandboxPool(backend, bench_spec(work_root), options.pool_size) as pool:
        for _ in range(options.runs):
            await pool.wait_full()
            started = time.perf_counter()
            async with pool.acquire() as sandbox:
                await sandbox.client.run(TRUE)
                samples.append(_ms_since(started))
                if idle is None:
                    idle = await idle_pss(sandbox)
    return samples, idle


async def density(
    backend: SandboxBackend, work_root: Path, options: BenchOptions
) -> dict[str, Any]:
    """Start idle sandboxes, ``density_concurrency`` at a time as a pool refilling would,
    until the time, memory or count cap; then destroy them all."""
    started_at = time.perf_counter()
    state = {"launched": 0, "count": 0, "pss": 0}

    def room() -> bool:
        return (
            state["launched"] < options.density_max
            and state["pss"] < DENSITY_BYTES
            and time.perf_counter() - started_at <= options.density_seconds
        )

    async with AsyncExitStack() as stack:

        async def starter() -> None:
            while room():
                state["launched"] += 1
                spec = bench_spec(work_root / uuid.uuid4().hex[:12])
                sandbox = await stack.enter_async_context(backend.create(spec))
                state["count"] += 1
                state["pss"] += await sandbox_pss(sandbox) or 0

        async with asyncio.TaskGroup() as group:  # one failure cancels the other starters
            for _ in range(options.density_concurrency):
                group.create_task(starter())
        seconds = time.perf_counter() - started_at
    return {
        "backend": backend.name,
        "started": state["count"],
        "seconds": round(seconds, 2),
        "total_pss_mb": _mb(state["pss"]),
    }


async def bench_backend(
    backend: SandboxBackend, work_root: Path, options: BenchOptions
) -> dict[str, Any]:
    warm, idle = await warm_start_ms(backend, work_root, options)
    cold, alone = await cold_start_ms(backend, work_root, options.runs)
    return {
        "start_ms": percentiles(warm),
        "cold_start_ms": percentiles(cold),
        "idle_pss_mb": _mb(idle),
        "idle_pss_alone_mb": _mb(alone),
    }


def available_backends(names: tuple[str, ...] = ()) -> list[SandboxBackend]:
    """An instance of every registered backend (or of ``names``) that works here."""
    factories = load_backends()
    chosen = [factories[n] for n in names if n in factories] if names else factories.values()
    backends = [factory() for factory in chosen]
    return [backend for backend in backends if backend.availability().available]


async def run_bench(options: BenchOptions, work_root: Path = WORK_ROOT) -> dict[str, Any]:
    """Every measurement, as the one JSON object ``forgehand bench sandbox`` prints."""
    await asyncio.to_thread(work_root.mkdir, 0o711, True, True)
    host = await host_spawn_ms(options.runs)
    backends = await asyncio.to_thread(available_backends, options.backends)
    if not backends:
        raise SandboxError("no sandbox backend to measure: see `forgehand doctor`")
    results = {b.name: await bench_backend(b, work_root, options) for b in backends}
    name = options.backends[0] if options.backends else None
    default = await asyncio.to_thread(choose_backend, bench_spec(work_root), name)
    return {
        "host_spawn_ms": percentiles(host),
        "backends": results,
        "density": await density(default, work_root, options),
    }
