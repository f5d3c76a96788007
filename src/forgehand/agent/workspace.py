"""Git on the host side of a local agent run: copy a checkout in, take the result out.

The agent works in a clone of the repository (`git clone --local --no-hardlinks`), so the
original work tree is never touched. The result is taken out without trusting anything
the agent could have written in that clone's `.git` (hooks, config, filters): a separate
git dir owned by the host, borrowing the original's objects through `alternates`, indexes
the copy's work tree on top of the base commit and commits it with a bot author. The
original repository then fetches that commit as a new branch.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

BOT_NAME = "forgehand[bot]"
BOT_EMAIL = "forgehand-bot@localhost"
_DEFAULT_EXCLUDES = "__pycache__/\n*.pyc\n.pytest_cache/\n.mypy_cache/\n.ruff_cache/\n"
_SAFE_CONFIG = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false")


class GitError(Exception):
    """A git command failed; the message has its stderr and what to check."""


async def git(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run git, return its stdout; raise `GitError` with stderr when it fails."""
    process = await asyncio.create_subprocess_exec(
        "git",
        *_SAFE_CONFIG,
        *args,
        cwd=cwd,
        env={**_base_env(), **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise GitError(f"git {' '.join(args)} failed: {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace").strip()


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_TERMINAL_PROMPT"] = "0"
    return env


async def repo_root(path: Path) -> Path:
    """The top of the work tree that contains `path`."""
    try:
        return Path(await git("-C", str(path), "rev-parse", "--show-toplevel"))
    except (GitError, OSError) as exc:
        raise GitError(
            f"{path} is not a git checkout ({exc}); pass --repo a git work tree"
        ) from None


async def head_commit(repo: Path) -> str:
    """The commit checked out in `repo`."""
    try:
        return await git("-C", str(repo), "rev-parse", "--verify", "HEAD^{commit}")
    except GitError:
        raise GitError(f"{repo} has no commit yet: commit something first") from None


async def git_dir(repo: Path) -> Path:
    """The (common) git dir of `repo`, absolute."""
    path = await git("-C", str(repo), "rev-parse", "--path-format=absolute", "--git-common-dir")
    return Path(path)


async def clone_copy(repo: Path, destination: Path) -> None:
    """A full copy of `repo`'s committed state in `destination` (an empty directory)."""
    await git("clone", "--quiet", "--local", "--no-hardlinks", str(repo), str(destination))


async def snapshot(
    repo: Path, work_tree: Path, scratch: Path, base: str, branch: str, message: str
) -> str | None:
    """Commit `work_tree` on top of `base` as `branch` in `repo`; None if nothing changed."""
    host_git = scratch / "result.git"
    await _host_git_dir(repo, host_git)
    tree_args = ("--git-dir", str(host_git), "--work-tree", str(work_tree), "-c", "core.bare=false")
    await git(*tree_args, "read-tree", base)
    await git(*tree_args, "add", "--all", "--", ".")
    tree = await git(*tree_args, "write-tree")
    if tree == await git("--git-dir", str(host_git), "rev-parse", f"{base}^{{tree}}"):
        return None
    commit = await git(
        "--git-dir", str(host_git), "commit-tree", tree, "-p", base, "-m", message, env=_bot()
    )
    await git("--git-dir", str(host_git), "update-ref", f"refs/heads/{branch}", commit)
    await git("-C", str(repo), "fetch", "--quiet", "--no-tags", str(host_git),
              f"refs/heads/{branch}:refs/heads/{branch}")  # fmt: skip
    return commit


async def _host_git_dir(repo: Path, path: Path) -> None:
    await git("init", "--quiet", "--bare", str(path))
    objects = await git_dir(repo) / "objects"
    info = path / "objects" / "info"
    await asyncio.to_thread(_write, info / "alternates", f"{objects}\n")
    await asyncio.to_thread(_write, path / "info" / "exclude", _DEFAULT_EXCLUDES)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _bot() -> dict[str, str]:
    return {
        "GIT_AUTHOR_NAME": BOT_NAME,
        "GIT_AUTHOR_EMAIL": BOT_EMAIL,
        "GIT_COMMITTER_NAME": BOT_NAME,
        "GIT_COMMITTER_EMAIL": BOT_EMAIL,
    }
