"""Resolving ``step:`` references into a tree of loaded steps.

Kinds of reference:

* local path (``./dir``, ``../x/step.yml``): relative to the referring file's directory;
  a directory means its ``func.yml`` (or, for older steps, ``step.yml``);
* ``builtin://NAME``: a step the runner implements natively; its spec comes from a
  ``BuiltinRegistry`` that the runner fills;
* git ``URL@REV`` / ``URL/-/DIR@REV`` / ``{git: {url, rev, dir}}``: fetched by a
  ``StepFetcher`` (``GitFetcher`` clones into a cache directory; ``CachedCheckouts`` only
  looks checkouts up, for a sandbox whose git references the trusted side fetched);
* OCI: refused with a message saying how to vendor the step instead.

A step fetched from git may reference files of its own repository only: a local path that
leaves the checkout is an error. ``Resolver(confine=DIR)`` holds every local reference to
``DIR`` the same way (the trusted side resolving a repository's steps).

Recursion through references (a -> b -> a) raises ``ReferenceCycleError`` naming the cycle.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from forgehand.steps.errors import (
    FetchError,
    Position,
    ReferenceCycleError,
    StepReferenceError,
    UnsupportedReferenceError,
)
from forgehand.steps.loader import find_step_file, load_step_file, parse_reference_text
from forgehand.steps.model import BuiltinRef, GitRef, OciRef, Spec, StepFile, StepRef

OCI_UNSUPPORTED = (
    "OCI step references are not supported yet; vendor the step into .forgehand/steps/ "
    "or use a git reference"
)


class StepFetcher(Protocol):
    """Makes a remote step repository available on disk."""

    async def fetch(self, url: str, rev: str) -> Path:
        """A directory holding ``url`` checked out at ``rev``."""
        ...


class BuiltinRegistry:
    """Specs of the steps the runner implements natively, by name (``builtin://NAME``)."""

    def __init__(self, specs: Mapping[str, Spec] | None = None) -> None:
        self._specs: dict[str, Spec] = dict(specs or {})

    def register(self, name: str, spec: Spec) -> None:
        """Make ``builtin://name`` resolvable."""
        self._specs[name] = spec

    def get(self, name: str) -> Spec | None:
        """The spec of ``builtin://name``, or None."""
        return self._specs.get(name)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._specs)


@dataclass(frozen=True)
class ResolvedStep:
    """A step with everything it references resolved, recursively.

    ``key`` identifies the step (absolute file path, ``builtin://NAME`` or
    ``URL@REV:DIR``). ``children`` maps each run item name to its resolved target
    (``None`` for ``script:`` items).
    """

    key: str
    spec: Spec
    file: StepFile | None = None
    children: Mapping[str, ResolvedStep | None] = field(default_factory=dict)

    @property
    def is_builtin(self) -> bool:
        """Whether the runner implements this step natively."""
        return self.file is None


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_REV = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_./+-]*$")
_REMOTE_SCHEMES = ("https", "http", "ssh", "git")
_SCP_LIKE = re.compile(r"^[A-Za-z0-9_.-]+@[A-Za-z0-9_.-]+:[^/-]")


def cache_name(url: str, rev: str) -> str:
    """The directory name of ``url`` at ``rev`` in a step cache."""
    digest = hashlib.sha256(f"{url}\0{rev}".encode()).hexdigest()[:16]
    return f"{_SAFE.sub('_', url.rsplit('/', 1)[-1])[:40]}-{_SAFE.sub('_', rev)[:40]}-{digest}"


def request_reference(text: str, pos: Position) -> StepRef:
    """A reference given to run, outside any step file: as in a step file, except that a
    bare relative path (``dir/step.yml``) is a local path too."""
    if not text.startswith(("builtin://", "/", ".")) and "@" not in text:
        text = "./" + text
    return parse_reference_text(text, pos)


def _existing_step_file(path: Path) -> Path:
    return find_step_file(path.resolve()).resolve(strict=True)


def _git_problem(stderr: bytes) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    fatal = [line for line in lines if line.startswith(("fatal:", "error:"))]
    return (fatal or lines or ["no output"])[0]


def check_git_source(url: str, rev: str, *, local: bool) -> None:
    """Refuse what must not reach ``git fetch``: option-like or odd revisions, and unless
    ``local``, anything but a remote URL (``file://`` and paths would copy this machine's
    files into a sandbox; git's ``ext::`` runs commands)."""
    if url.startswith("-") or not url.strip():
        raise FetchError(f"{url!r} is not a git URL")
    if not _REV.match(rev) or ".." in rev:
        raise FetchError(f"{rev!r} is not a git revision (a tag, branch or commit SHA)")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in _REMOTE_SCHEMES or (not scheme and _SCP_LIKE.match(url)):
        return
    if local and (scheme == "file" or (not scheme and url.startswith("/"))):
        return
    allowed = ", ".join(f"{s}://" for s in _REMOTE_SCHEMES)
    raise FetchError(
        f"{url!r}: step repositories are fetched from {allowed} or user@host:path URLs"
        + ("" if local else " (local paths and file:// are refused here)")
    )


class GitFetcher:
    """Fetches git step repositories with the ``git`` command into ``cache_dir``.

    A checkout is keyed by URL and revision and reused once present; a branch name is
    therefore pinned at its first fetch (use tags or commit SHAs for reproducibility).
    ``local`` allows ``file://`` URLs and paths: right where the fetched files stay with
    whoever could read them anyway (the runner's own engine, a person's own CLI), wrong on
    the trusted side fetching for a sandbox.
    """

    def __init__(self, cache_dir: Path, git: str = "git", *, local: bool = False) -> None:
        self.cache_dir = cache_dir
        self.git = git
        self.local = local

    async def fetch(self, url: str, rev: str) -> Path:
        """Clone ``url`` at ``rev`` into the cache unless already there."""
        check_git_source(url, rev, local=self.local)
        target = self.cache_dir / cache_name(url, rev)
        if await asyncio.to_thread(target.is_dir):
            return target
        await asyncio.to_thread(self.cache_dir.mkdir, parents=True, exist_ok=True)
        scratch = self.cache_dir / f".tmp-{uuid.uuid4().hex}"
        try:
            await self._checkout(scratch, url, rev)
            await asyncio.to_thread(os.replace, scratch, target)
        except OSError:
            if not await asyncio.to_thread(target.is_dir):
                raise FetchError(f"cannot store {url}@{rev} in {self.cache_dir}") from None
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)
        return target

    async def _checkout(self, scratch: Path, url: str, rev: str) -> None:
        await self._run("init", "init", "-q", str(scratch))
        at = ("-C", str(scratch))
        try:
            await self._run("fetch", *at, "fetch", "-q", "--depth=1", "--", url, rev)
            checkout = "FETCH_HEAD"
        except FetchError:
            refs = ["+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*"]
            await self._run("fetch", *at, "fetch", "-q", "--", url, *refs)
            checkout = rev
        detached = ("-c", "advice.detachedHead=false")
        await self._run("checkout", *at, *detached, "checkout", "-q", checkout, "--")

    async def _run(self, what: str, *args: str) -> None:
        protocols = ["git", "http", "https", "ssh", *(["file"] if self.local else [])]
        env = {
            **os.environ,
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ALLOW_PROTOCOL": ":".join(protocols),
        }
        try:
            process = await asyncio.create_subprocess_exec(
                self.git,
                *args,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
        except FileNotFoundError:
            raise FetchError(
                f"{self.git} not found: install git to use git step references"
            ) from None
        _, stderr = await process.communicate()
        if process.returncode != 0:
            raise FetchError(f"git {what} failed: {_git_problem(stderr)}")


class Resolver:
    """Loads a step and, recursively, every step it references."""

    def __init__(
        self,
        *,
        fetcher: StepFetcher | None = None,
        builtins: BuiltinRegistry | None = None,
        confine: Path | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.builtins = builtins or BuiltinRegistry()
        self.confine = confine.resolve() if confine is not None else None
        self._done: dict[str, ResolvedStep] = {}

    async def resolve(self, path: str | Path) -> ResolvedStep:
        """Load the step at ``path`` (file or directory) and everything it references."""
        file = await asyncio.to_thread(_existing_step_file, Path(path))
        return await self._resolve_file(file, [], self.confine)

    async def resolve_loaded(self, step: StepFile) -> ResolvedStep:
        """Resolve the references of an already loaded step."""
        key = await asyncio.to_thread(os.path.realpath, step.path)
        return await self._resolve_step(step, [key], self.confine)

    async def resolve_reference(
        self, ref: StepRef, base: Path, pos: Position | None = None
    ) -> ResolvedStep:
        """Resolve a reference given outside any step file (local paths relative to ``base``)."""
        where = pos or Position(str(ref), 1, 1)
        return await self._target(ref, base, [], where, self.confine)

    async def _resolve_file(self, file: Path, stack: list[str], root: Path | None) -> ResolvedStep:
        key = str(file)
        if key in self._done:
            return self._done[key]
        loaded = await asyncio.to_thread(load_step_file, file)
        resolved = await self._resolve_step(loaded, [*stack, key], root)
        self._done[key] = resolved
        return resolved

    async def _resolve_step(
        self, step: StepFile, stack: list[str], root: Path | None
    ) -> ResolvedStep:
        children: dict[str, ResolvedStep | None] = {}
        for item in step.definition.run or ():
            pos = item.ref_pos or item.pos
            children[item.name] = (
                await self._target(item.ref, step.directory, stack, pos, root) if item.ref else None
            )
        return ResolvedStep(key=stack[-1], spec=step.spec, file=step, children=children)

    async def _target(
        self, ref: StepRef, base: Path, stack: list[str], pos: Position, root: Path | None
    ) -> ResolvedStep:
        """``root``: the directory local references must stay in (a git checkout's, or
        ``confine``), None for no bound."""
        if isinstance(ref, BuiltinRef):
            return self._builtin(ref, pos)
        if isinstance(ref, OciRef):
            raise UnsupportedReferenceError(OCI_UNSUPPORTED, pos)
        if isinstance(ref, GitRef):
            root = await self._fetch(ref, pos)
            file = await self._find(root, ref.dir or ".", root, pos)
        else:
            file = await self._find(base, ref.path, root, pos)
        if str(file) in stack:
            cycle = [*stack[stack.index(str(file)) :], str(file)]
            raise ReferenceCycleError(cycle, pos)
        return await self._resolve_file(file, stack, root)

    def _builtin(self, ref: BuiltinRef, pos: Position) -> ResolvedStep:
        spec = self.builtins.get(ref.name)
        if spec is None:
            known = ", ".join(self.builtins.names()) or "none registered"
            raise StepReferenceError(f"unknown builtin step {ref.name!r} (known: {known})", pos)
        return ResolvedStep(key=f"builtin://{ref.name}", spec=spec)

    async def _find(self, base: Path, relative: str, root: Path | None, pos: Position) -> Path:
        try:
            file = await asyncio.to_thread(_existing_step_file, base / relative)
        except OSError as exc:
            raise StepReferenceError(f"step {relative!r} not found: {exc}", pos) from None
        if root is not None and not file.is_relative_to(await asyncio.to_thread(root.resolve)):
            raise StepReferenceError(
                f"step {relative!r} is outside {root}: a step may reference files of its "
                "own repository only",
                pos,
            )
        return file

    async def _fetch(self, ref: GitRef, pos: Position) -> Path:
        if self.fetcher is None:
            raise StepReferenceError(
                f"{ref.url}@{ref.rev} is a git reference but no fetcher is configured", pos
            )
        try:
            return await self.fetcher.fetch(ref.url, ref.rev)
        except FetchError as exc:
            raise FetchError(f"cannot fetch {ref.url}@{ref.rev}: {exc.message}", pos) from None


class CachedCheckouts:
    """A fetcher that never fetches: it finds checkouts the trusted side put into
    ``cache_dir`` (a step run in a sandbox, which has no business reaching git remotes)."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    async def fetch(self, url: str, rev: str) -> Path:
        """The staged checkout of ``url`` at ``rev``."""
        target = self.cache_dir / cache_name(url, rev)
        if await asyncio.to_thread(target.is_dir):
            return target
        raise FetchError(
            "not fetched by the trusted side, and a sandbox does not fetch: reference it "
            "from a step file that exists when the run starts"
        )
