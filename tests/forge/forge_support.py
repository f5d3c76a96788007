"""Helpers shared by the forge tests (a uniquely named module, unlike conftest)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable

TOKEN = "glpat-test-token-0123456789"
GH_TOKEN = "ghp_testtoken0123456789"
GITLAB_PROJECT = "group/sub/project"
GITHUB_REPO = "octo/widgets"


class RecordingSleep:
    """Stands in for asyncio.sleep so backoff is asserted, not waited for."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def git(
    *args: str, cwd: str | os.PathLike[str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=check, env=os.environ.copy()
    )


Pusher = Callable[..., subprocess.CompletedProcess[str]]
