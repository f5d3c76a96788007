"""The host-side mirror cache: one bare repository per forge repository, fetched incrementally.

Credentials are used only here, on the host, and only for the one git command that needs
them: they travel in `GIT_CONFIG_*` environment variables (an `http.extraHeader`), never
in a URL, an argument list or the mirror's config. A sandbox is seeded from the mirror by
a local clone into its work dir, which needs no credentials at all.

Refs: `refs/heads/*` and `refs/tags/*` follow the forge (pruned); a run's result is kept
under `refs/forgehand/runs/<run id>`, out of the fetch refspec, so a fetch never drops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from forgehand.agent.workspace import GitError, git
from forgehand.forge.base import GitCredentials

FETCH_REFSPECS = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")


def credential_env(url: str, credentials: GitCredentials | None) -> dict[str, str]:
    """Environment that authenticates one git command against `url` (empty for paths)."""
    if credentials is None or not url.startswith(("http://", "https://")):
        return {}
    return {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "http.extraHeader",
        "GIT_CONFIG_VALUE_0": credentials.http_extra_header(),
    }


def result_ref(run_id: str) -> str:
    """Where a run's result commit is kept in the mirror."""
    return f"refs/forgehand/runs/{run_id}"


@dataclass(frozen=True)
class Mirror:
    """A synced mirror: its path and the forge's default branch and its head."""

    path: Path
    url: str
    default_branch: str
    head: str

    async def git(self, *args: str, env: dict[str, str] | None = None) -> str:
        return await git("--git-dir", str(self.path), *args, env=env)

    async def show(self, commit: str, path: str) -> str | None:
        """A file's text at `commit`, or None when it does not exist there."""
        try:
            return await self.git("show", f"{commit}:{path}")
        except GitError:
            return None


class MirrorCache:
    """Bare mirrors under `root`, one per repository URL."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, url: str) -> Path:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", url.rstrip("/").rsplit("/", 1)[-1])[:40]
        return self.root / f"{name}-{digest}.git"

    async def sync(self, url: str, credentials: GitCredentials | None) -> Mirror:
        """Create the mirror if needed, fetch what is new, and read the default branch."""
        path = self.path_for(url)
        auth = credential_env(url, credentials)
        async with _locked(path.with_suffix(".lock")):
            if not await asyncio.to_thread((path / "HEAD").is_file):
                await _create(path, url)
            await git("--git-dir", str(path), "fetch", "--quiet", "--prune", "origin", env=auth)
            branch = await _remote_default_branch(path, auth)
            await git("--git-dir", str(path), "symbolic-ref", "HEAD", f"refs/heads/{branch}")
            head = await git("--git-dir", str(path), "rev-parse", f"refs/heads/{branch}")
        return Mirror(path, url, branch, head)


async def _create(path: Path, url: str) -> None:
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    await git("init", "--quiet", "--bare", str(path))
    await git("--git-dir", str(path), "remote", "add", "origin", url)
    await git("--git-dir", str(path), "config", "--unset-all", "remote.origin.fetch")
    for spec in FETCH_REFSPECS:
        await git("--git-dir", str(path), "config", "--add", "remote.origin.fetch", spec)
    await git("--git-dir", str(path), "config", "gc.auto", "0")


async def _remote_default_branch(path: Path, auth: dict[str, str]) -> str:
    out = await git("--git-dir", str(path), "ls-remote", "--symref", "origin", "HEAD", env=auth)
    for line in out.splitlines():
        if line.startswith("ref: refs/heads/") and line.endswith("\tHEAD"):
            return line.removeprefix("ref: refs/heads/").removesuffix("\tHEAD")
    raise GitError(
        f"the repository at {path} has no default branch (HEAD): push a branch to it first"
    )


@contextlib.asynccontextmanager
async def _locked(lock_path: Path) -> AsyncIterator[None]:
    """An exclusive lock across processes (flock, taken in a worker thread)."""
    await asyncio.to_thread(lock_path.parent.mkdir, parents=True, exist_ok=True)
    handle = await asyncio.to_thread(lock_path.open, "a")
    try:
        await asyncio.to_thread(fcntl.flock, handle, fcntl.LOCK_EX)
        yield
    finally:
        await asyncio.to_thread(handle.close)


async def seed_checkout(mirror: Mirror, destination: Path, commit: str) -> None:
    """A checkout of `commit` on the default branch in `destination`, cloned from the mirror.

    `--local --no-hardlinks` copies the object files (no pack negotiation, and nothing the
    sandbox can change is shared with the mirror); the clone keeps no remote.
    """
    branch = mirror.default_branch
    await git(
        "clone",
        "--quiet",
        "--local",
        "--no-hardlinks",
        "--no-checkout",
        "--branch",
        branch,
        str(mirror.path),
        str(destination),
    )
    await git("-C", str(destination), "remote", "remove", "origin")
    await git("-C", str(destination), "checkout", "--quiet", "-B", branch, commit)
