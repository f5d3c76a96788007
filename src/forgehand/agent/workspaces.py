"""Where an agent works: a runner over a work dir, in this process or in a sandbox.

    async with scratch_dir() as scratch, open_workspace("bwrap", scratch) as space:
        await space.client.run(RunSpec(argv=("ls",), cwd=space.sandbox_dir, env=space.env))

`--sandbox none` starts an in-process `RunnerCore` over `<scratch>/work`; any other name
asks `forgehand.sandbox.backend.choose_backend` for that backend. Either way the caller
gets a `Workspace`: the runner client, the work dir as the host and the sandbox see it,
and the environment runs get. The environment is built here from fixed values, never
from the host's environment (PATH aside), so no credential can reach a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from forgehand.runner.client import LocalTransport, RunnerClient
from forgehand.runner.config import MAX_STATE_DIR_CHARS, RunnerConfig
from forgehand.runner.core import RunnerCore

if TYPE_CHECKING:
    from forgehand.sandbox.rootfs import SandboxEnd
    from forgehand.sandbox.spec import NetworkPolicy

NO_SANDBOX = "none"
_QUIET_TOOLS = {"TERM": "dumb", "PAGER": "cat", "GIT_PAGER": "cat", "LANG": "C.UTF-8"}


class WorkspaceError(Exception):
    """The workspace could not be set up; the message says what to fix."""


@dataclass(frozen=True)
class Workspace:
    """A runner client, and the work dir as host and sandbox see it."""

    client: RunnerClient
    host_dir: Path
    sandbox_dir: str
    env: dict[str, str]
    backend: str = NO_SANDBOX
    detail: str = field(default="in-process runner, no isolation")
    egress_log: Path | None = None
    """The egress proxy's decision log on the host (sandboxes with network: proxy)."""
    ending: asyncio.Future[SandboxEnd] | None = None
    """Done when the sandbox stops on its own (``EndsOnItsOwn``: gVisor out of memory)."""
    oom_kills: Callable[[], Awaitable[int]] | None = None
    """The sandbox's OOM kill count, where its runner cannot see them (``CountsOomKills``)."""

    async def why_ended(self, grace: float = 5.0) -> str | None:
        """Why the sandbox stopped on its own, as ``oom: <detail>``; None if it has not
        within ``grace`` seconds or cannot say. For a runner that stopped answering: the
        client has retried for seconds by then, so its watcher has usually seen the end."""
        if self.ending is None:
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.ending), grace)
        if not self.ending.done() or self.ending.cancelled() or self.ending.exception():
            return None
        return str(self.ending.result())

    def denied_hosts(self) -> list[str]:
        """Hosts the egress proxy refused so far, in order (blocking file read)."""
        return list(self.denials())

    def denials(self) -> dict[str, str]:
        """Each host the egress proxy refused so far, in order, with the reason of its
        first refusal (blocking file read)."""
        if self.egress_log is None or not self.egress_log.exists():
            return {}
        denied: dict[str, str] = {}
        for line in self.egress_log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                record = json.loads(line)
                if record.get("decision") == "denied" and record.get("host"):
                    denied.setdefault(str(record["host"]), str(record.get("reason") or ""))
        return denied


@contextlib.asynccontextmanager
async def scratch_dir(prefix: str = "fh-agent-") -> AsyncIterator[Path]:
    """A private temporary directory with a short path, removed afterwards."""
    parent = tempfile.gettempdir()
    if len(parent) > MAX_STATE_DIR_CHARS - 30:
        parent = "/tmp"  # the runner's state dir needs a short path (unix sockets)
    path = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=prefix, dir=parent))
    await asyncio.to_thread(path.chmod, 0o711)  # a sandbox's own uid must reach work/
    try:
        yield path
    finally:
        await asyncio.to_thread(shutil.rmtree, path, True)


@contextlib.asynccontextmanager
async def open_workspace(
    kind: str,
    scratch: Path,
    *,
    path_prefix: Sequence[str] = (),
    network: NetworkPolicy | None = None,
    root: dict[str, str] | None = None,
) -> AsyncIterator[Workspace]:
    """A workspace over `<scratch>/work`; `path_prefix` directories go first on PATH.
    `network` applies to sandboxes (default: none); without a sandbox there is no policy.
    `root` is a sandbox's root filesystem as the spec takes it (default: the host's); a
    custom one brings its own programs, so `path_prefix` (host paths) does not apply."""
    work = scratch / "work"
    await asyncio.to_thread(work.mkdir)
    if kind == NO_SANDBOX:
        async with _local_runner(scratch, work, path_prefix) as space:
            yield space
        return
    if root is not None and root.get("type", "host") != "host":
        path_prefix = ()
    async with _sandboxed(kind, work, path_prefix, network, root) as space:
        yield space


def _with_path(env: dict[str, str], prefix: Sequence[str], default: str) -> dict[str, str]:
    path = ":".join([*prefix, env.get("PATH", default)])
    return {**env, "PATH": path}


@contextlib.asynccontextmanager
async def _local_runner(
    scratch: Path, work: Path, path_prefix: Sequence[str]
) -> AsyncIterator[Workspace]:
    home = scratch / "home"
    await asyncio.to_thread(home.mkdir)
    config = RunnerConfig(state_dir=scratch / "state", roots=(work,))
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(home),
        "PYTHONDONTWRITEBYTECODE": "1",
        **_QUIET_TOOLS,
    }
    env = _with_path(env, path_prefix, "/usr/bin:/bin")
    async with RunnerCore(config) as core, RunnerClient(LocalTransport(core)) as client:
        yield Workspace(client, work, str(work), env)


@contextlib.asynccontextmanager
async def _sandboxed(
    kind: str,
    work: Path,
    path_prefix: Sequence[str],
    network: NetworkPolicy | None,
    root: dict[str, str] | None,
) -> AsyncIterator[Workspace]:
    from forgehand.sandbox import backend as backends
    from forgehand.sandbox.backend import CountsOomKills, EndsOnItsOwn
    from forgehand.sandbox.errors import SandboxError
    from forgehand.sandbox.runs import run_environment
    from forgehand.sandbox.spec import NoNetwork, ProxyNetwork, SandboxSpec, WorkDir

    try:
        spec = SandboxSpec.model_validate(
            {
                "work_dir": WorkDir(host_path=work),
                "network": network or NoNetwork(),
                "root": root or {"type": "host"},
            }
        )
    except ValueError as exc:  # pydantic's ValidationError names the field
        raise WorkspaceError(f"the sandbox's root is invalid: {exc}") from None
    try:
        backend = backends.choose_backend(spec, kind)
    except SandboxError as exc:
        raise WorkspaceError(
            f"sandbox {kind!r} is not available here ({exc}); install what it needs or "
            "run with --sandbox none"
        ) from None
    async with contextlib.AsyncExitStack() as stack:
        try:
            sandbox = await stack.enter_async_context(backend.create(spec))
        except SandboxError as exc:
            raise WorkspaceError(f"cannot start the {kind} sandbox: {exc}") from None
        env = _with_path(
            {**run_environment(spec), **_QUIET_TOOLS, "PYTHONDONTWRITEBYTECODE": "1"},
            path_prefix,
            "/usr/bin:/bin",
        )
        ending = None
        if isinstance(sandbox, EndsOnItsOwn):
            ending = asyncio.ensure_future(sandbox.wait_ended())
            stack.push_async_callback(_stop, ending)
        directory = getattr(sandbox, "directory", None)
        egress_log = None
        if isinstance(spec.network, ProxyNetwork) and directory is not None:
            egress_log = Path(directory) / "egress" / "decisions.jsonl"
        yield Workspace(
            sandbox.client,
            sandbox.work_dir,
            str(spec.work_dir.sandbox_path),
            env,
            backend=kind,
            detail=f"{kind} sandbox, isolation {sandbox.achieved.isolation}, "
            f"network {spec.network.mode}"
            + ("" if sandbox.achieved.root == "host" else f", root {sandbox.achieved.root}"),
            egress_log=egress_log,
            ending=ending,
            oom_kills=sandbox.oom_kills if isinstance(sandbox, CountsOomKills) else None,
        )


async def _stop(task: asyncio.Future[SandboxEnd]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def give_to_owner_of(work: Path, tree: Path) -> None:
    """chown `tree` to the owner of `work` (a sandbox's own uid owns its work dir)."""
    owner = work.stat()
    if os.geteuid() != 0 or owner.st_uid == os.geteuid():
        return
    for directory, dirs, files in os.walk(tree):
        for name in [directory, *(os.path.join(directory, n) for n in dirs + files)]:
            os.lchown(name, owner.st_uid, owner.st_gid)


def check_env(env: Mapping[str, str], secrets: Sequence[str]) -> None:
    """Refuse an environment in which any secret appears."""
    for name, value in env.items():
        if any(secret and secret in value for secret in secrets):
            raise WorkspaceError(f"the sandbox environment variable {name} holds a secret")
