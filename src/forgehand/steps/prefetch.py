"""Git step references fetched on the trusted side, for step runs inside a sandbox.

A sandbox has no route to git remotes and holds no credential, so the host resolves the
step tree first: every git reference in it, recursively, is fetched into the host's step
cache (``GitFetcher``, remote URLs only: a ``file://`` URL would copy this machine's files
into the sandbox). The checkouts the tree uses, and only those, are then copied into a
directory the sandbox can read; the run names it as its ``step_cache_dir`` and the engine
inside finds them there (``CachedCheckouts``) without fetching anything.

Local references are resolved on the host too, so they are held to a root (the
repository, or the step's own directory): a step file cannot make the host read files
outside it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from forgehand.steps.errors import Position
from forgehand.steps.references import GitFetcher, Resolver, StepFetcher, request_reference


@dataclass
class RecordingFetcher:
    """Fetches through ``inner`` and remembers each checkout it handed out."""

    inner: StepFetcher
    checkouts: dict[str, Path] = field(default_factory=dict)

    async def fetch(self, url: str, rev: str) -> Path:
        """``inner``'s checkout of ``url`` at ``rev``, recorded."""
        path = await self.inner.fetch(url, rev)
        self.checkouts[path.name] = path
        return path


def default_cache_dir() -> Path:
    """The host's step cache: ``$XDG_CACHE_HOME/forgehand/steps``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "forgehand" / "steps"


async def prefetch(ref: str, base: Path, cache: Path, *, confine: Path | None = None) -> list[Path]:
    """Resolve the step ``ref`` (a path relative to ``base``, or ``URL@REV``) with every
    step it references, fetching git references into ``cache``; the checkouts it uses.

    Raises ``StepError`` (with the position) when the tree does not resolve. Local
    references must stay inside ``confine`` (default: ``base``).
    """
    from forgehand.steps.builtins import BuiltinCatalog

    pos = Position("<request>", 1, 1)
    fetcher = RecordingFetcher(GitFetcher(cache))
    resolver = Resolver(fetcher=fetcher, builtins=BuiltinCatalog(), confine=confine or base)
    await resolver.resolve_reference(request_reference(ref, pos), base, pos)
    return sorted(fetcher.checkouts.values())


def stage(checkouts: Iterable[Path], into: Path) -> None:
    """Copy checkouts into ``into`` under their cache names, without ``.git`` (blocking)."""
    into.mkdir(parents=True, exist_ok=True)
    for checkout in checkouts:
        shutil.copytree(
            checkout,
            into / checkout.name,
            symlinks=True,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(".git"),
        )
