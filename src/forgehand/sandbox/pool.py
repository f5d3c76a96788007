"""A warm pool: sandboxes started ahead of time, each handed out once.

    async with SandboxPool(backend, spec, size=4) as pool:
        async with pool.acquire() as sandbox:      # ready at once when the pool is warm
            await sandbox.client.run(...)
        # that sandbox is destroyed; a new one is started in the background

Works with any backend. ``spec.work_dir.host_path`` is the *parent* of the pool's work
dirs: sandbox N gets ``<host_path>/<random>``, made and removed by the backend. A
sandbox's wall time starts when it is handed out (for backends that support
``restart_wall_clock``). If starting a sandbox fails, the next ``acquire`` raises that
error, and the pool tries again on the acquire after.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from forgehand.sandbox.backend import Sandbox, SandboxBackend
from forgehand.sandbox.errors import SandboxError, SandboxStateError
from forgehand.sandbox.spec import SandboxSpec


class PoolState(StrEnum):
    """Lifecycle of a ``SandboxPool``."""

    CREATED = "created"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@runtime_checkable
class WallClocked(Protocol):
    """A sandbox whose wall time can be restarted when it is handed out."""

    def restart_wall_clock(self) -> None: ...


@dataclass
class _Warm:
    sandbox: Sandbox
    stack: AsyncExitStack


class SandboxPool:
    """Keeps ``size`` started sandboxes of one spec ready."""

    def __init__(self, backend: SandboxBackend, spec: SandboxSpec, size: int) -> None:
        if size < 1:
            raise ValueError("a pool needs size >= 1")
        self.backend = backend
        self.spec = spec
        self.size = size
        self.state = PoolState.CREATED
        self._ready: collections.deque[_Warm | BaseException] = collections.deque()
        self._added = asyncio.Event()
        self._wanted = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None

    @property
    def idle(self) -> int:
        """Sandboxes started and waiting to be handed out."""
        return sum(isinstance(item, _Warm) for item in self._ready)

    async def __aenter__(self) -> SandboxPool:
        if self.state is not PoolState.CREATED:
            raise SandboxStateError(f"pool is {self.state.value}: make a new SandboxPool")
        self.state = PoolState.RUNNING
        self._wanted.set()
        self._filler = asyncio.create_task(self._fill_forever())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.state = PoolState.CLOSING
        if self._filler is not None:
            self._filler.cancel()
            await asyncio.gather(self._filler, return_exceptions=True)
        while self._ready:
            item = self._ready.popleft()
            if isinstance(item, _Warm):
                await item.stack.aclose()
        self.state = PoolState.CLOSED

    async def wait_full(self) -> None:
        """Return once ``size`` sandboxes are ready (raises if starting one failed)."""
        while self.idle < self.size:
            self._raise_pending_error()
            self._added.clear()
            await self._added.wait()

    def acquire(self) -> AbstractAsyncContextManager[Sandbox]:
        """A ready sandbox for one ``async with``; destroyed at its end."""
        return self._acquire()

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[Sandbox]:
        if self.state is not PoolState.RUNNING:
            raise SandboxStateError(f"pool is {self.state.value}: use it inside `async with`")
        while not self._ready:
            self._added.clear()
            await self._added.wait()
        item = self._ready.popleft()
        self._wanted.set()
        if isinstance(item, BaseException):
            raise SandboxError(f"the pool could not start a sandbox: {item}") from item
        async with item.stack:
            if isinstance(item.sandbox, WallClocked):
                item.sandbox.restart_wall_clock()
            yield item.sandbox

    def _raise_pending_error(self) -> None:
        for item in self._ready:
            if isinstance(item, BaseException):
                raise SandboxError(f"the pool could not start a sandbox: {item}") from item

    async def _fill_forever(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            while len(self._ready) < self.size:
                item = await self._start_one()
                self._ready.append(item)
                self._added.set()
                if isinstance(item, BaseException):
                    break

    async def _start_one(self) -> _Warm | BaseException:
        stack = AsyncExitStack()
        try:
            sandbox = await stack.enter_async_context(self.backend.create(self._next_spec()))
        except asyncio.CancelledError:
            await stack.aclose()
            raise
        except Exception as exc:
            await stack.aclose()
            return exc
        return _Warm(sandbox, stack)

    def _next_spec(self) -> SandboxSpec:
        host = self.spec.work_dir.host_path / f"pool-{uuid.uuid4().hex[:12]}"
        work_dir = self.spec.work_dir.model_copy(update={"host_path": host})
        return self.spec.model_copy(update={"work_dir": work_dir})
