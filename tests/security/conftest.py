"""The hostile-code suite runs against EVERY backend in ``BACKENDS`` that works here.

A backend that is unavailable is skipped with its own availability detail, so a new
backend (gVisor, podman…) joins the suite by registering itself. Every probe is bounded
in time and count; a containment failure is a failed test, not a stalled machine.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from forgehand.runner.model import RunResult
from forgehand.sandbox.backend import Sandbox, SandboxBackend, load_backends
from forgehand.sandbox.egress.resolver import Resolver
from forgehand.sandbox.runs import run_spec
from forgehand.sandbox.spec import SandboxSpec

CANARY_NAME = "FORGEHAND_TEST_CANARY"
CANARY = f"canary-{secrets.token_hex(8)}"
os.environ[CANARY_NAME] = CANARY  # set in the test process before any sandbox starts
CREATE_SECONDS = 120.0
RUN_SECONDS = 120.0
DESTROY_SECONDS = 60.0
TEST_SECONDS = 240  # hard cap per test, fixtures included: a hanging backend fails, not stalls


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    def expire(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"hostile test exceeded {TEST_SECONDS}s: the backend under test hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", sorted(load_backends()))


@pytest.fixture
def make_backend(backend_name: str) -> Callable[..., SandboxBackend]:
    """Build the backend (optionally with a resolver override); skip if unavailable."""

    def build(resolver: Resolver | None = None) -> SandboxBackend:
        factory = load_backends()[backend_name]
        if resolver is None:
            backend = factory()
        elif "resolver" in inspect.signature(factory).parameters:
            backend = factory(resolver=resolver)  # type: ignore[call-arg]
        else:
            pytest.skip(f"backend {backend_name} takes no resolver override")
        status = backend.availability()
        if not status.available:
            pytest.skip(f"backend {backend_name} is unavailable: {status.detail}")
        return backend

    return build


@pytest.fixture
def canary() -> tuple[str, str]:
    """An environment variable of the test (service) process that no sandbox may see."""
    return CANARY_NAME, CANARY


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fh-sec-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
        if line.split()[1].startswith(f"{path}/"):
            subprocess.run(["umount", "-l", line.split()[1]], check=False)
    shutil.rmtree(path, ignore_errors=True)


def hostile_spec(base: Path, name: str = "work", **extra: Any) -> SandboxSpec:
    """Small limits: 128 MiB, 64 processes, a 16 MiB work dir, 60 s."""
    limits = {"memory_bytes": "128M", "pids": 64, "disk_bytes": "32M", "wall_time_seconds": 60}
    work = {"host_path": str(base / name), "size_bytes": "16M"}
    return SandboxSpec.model_validate({"work_dir": work, "limits": limits, **extra})


class Box:
    """A sandbox under test plus its spec, with a helper to run Python probes."""

    def __init__(self, sandbox: Sandbox, spec: SandboxSpec) -> None:
        self.sandbox = sandbox
        self.spec = spec

    async def run(self, argv: list[str], **fields: Any) -> RunResult:
        async with asyncio.timeout(RUN_SECONDS):
            return await self.sandbox.client.run(run_spec(self.spec, argv, **fields))

    async def probe(self, code: str, *args: str) -> Any:
        """Run Python ``code`` (which prints one JSON value) and return that value."""
        result = await self.run(["python3", "-c", textwrap.dedent(code), *args])
        assert result.exit.code == 0, result.stderr.decode()[-2000:]
        return json.loads(result.stdout)


@pytest.fixture
def open_box(
    make_backend: Callable[..., SandboxBackend], base: Path
) -> Callable[..., AbstractAsyncContextManager[Box]]:
    """``async with open_box(**spec_extra) as box`` — a fresh sandbox of the backend."""

    @asynccontextmanager
    async def open_(
        name: str = "work", resolver: Resolver | None = None, **extra: Any
    ) -> AsyncIterator[Box]:
        spec = hostile_spec(base, name, **extra)
        stack = AsyncExitStack()
        try:
            async with asyncio.timeout(CREATE_SECONDS):
                sandbox = await stack.enter_async_context(make_backend(resolver).create(spec))
            yield Box(sandbox, spec)
        finally:
            await asyncio.wait_for(stack.aclose(), DESTROY_SECONDS)

    return open_


@pytest.fixture
async def box(open_box: Callable[..., AbstractAsyncContextManager[Box]]) -> AsyncIterator[Box]:
    async with open_box() as opened:
        yield opened
