"""Git built-ins, through the ``git`` command in the work dir.

``git_status``, ``git_diff``, ``git_commit``, ``git_branch`` and ``git_bundle``. Hooks
and commit signing are switched off for every call (``core.hooksPath=/dev/null``,
``commit.gpgsign=false``): a commit made for the agent must not run code the agent wrote
into ``.git/hooks`` or wait for a key it does not have.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from forgehand.steps.builtins.base import Builtin, BuiltinContext, builtin
from forgehand.steps.errors import BuiltinError, StepError
from forgehand.steps.process import CapturedResult, run_captured

GIT_TIMEOUT = 300.0
MAX_DIFF_BYTES = 256 * 1024
_SAFE_CONFIG = ("-c", "core.hooksPath=/dev/null", "-c", "commit.gpgsign=false")
_TRAILER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*: \S.*$")


def _problem(stderr: bytes) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    fatal = [line for line in lines if line.startswith(("fatal:", "error:"))]
    return (fatal or lines or ["no output"])[0]


async def git(call: BuiltinContext, *args: str, env: dict[str, str] | None = None) -> bytes:
    """Run ``git ARGS`` in the work dir; its stdout, or a ``BuiltinError``."""
    result = await _git(call, args, env or {})
    if result.exit_code != 0:
        raise BuiltinError(
            "failed_precondition", f"git {args[0]} failed: {_problem(result.stderr)}"
        )
    return result.stdout


async def _git(
    call: BuiltinContext, args: tuple[str, ...], extra: dict[str, str]
) -> CapturedResult:
    env = {**call.env, "GIT_TERMINAL_PROMPT": "0", "GIT_PAGER": "cat", "LC_ALL": "C", **extra}
    argv = ["git", *_SAFE_CONFIG, *args]
    try:
        return await run_captured(argv, cwd=str(call.work_dir), env=env, kill_after=GIT_TIMEOUT)
    except StepError:
        raise BuiltinError("not_found", "git not found: install git in the sandbox") from None


async def _succeeds(call: BuiltinContext, *args: str) -> bool:
    return (await _git(call, args, {})).exit_code == 0


async def current_branch(call: BuiltinContext) -> str:
    """The checked-out branch, or ``""`` when HEAD is detached."""
    result = await _git(call, ("symbolic-ref", "--short", "-q", "HEAD"), {})
    if result.exit_code not in {0, 1}:
        raise BuiltinError(
            "failed_precondition", f"not a git repository: {_problem(result.stderr)}"
        )
    return result.stdout.decode().strip()


# --- git_status -------------------------------------------------------------------------

STATUS_SPEC = """
spec:
  description: >-
    Show the working tree status (git status --porcelain=v1): one "XY path" line per
    changed or untracked file, X for the index and Y for the work tree.
  outputs:
    status:
      type: string
      description: Porcelain v1 status lines; empty when nothing changed.
    clean:
      type: boolean
      description: True when there are no changes and no untracked files.
    branch:
      type: string
      description: The checked-out branch; empty when HEAD is detached.
"""


@builtin("git_status", STATUS_SPEC)
async def git_status(call: BuiltinContext) -> dict[str, Any]:
    """Porcelain status."""
    branch = await current_branch(call)
    status = (await git(call, "status", "--porcelain=v1")).decode(errors="replace")
    return {"status": status, "clean": not status.strip(), "branch": branch}


# --- git_diff ---------------------------------------------------------------------------

DIFF_SPEC = """
spec:
  description: >-
    Show changes as a unified diff: the work tree against the index, or with staged=true
    the index against HEAD. Untracked files are not included (see git_status). At most
    256 KiB is returned.
  inputs:
    staged:
      type: boolean
      default: false
      description: Diff the index against HEAD instead of the work tree against the index.
  outputs:
    diff:
      type: string
      description: The unified diff; empty when there are no changes.
    truncated:
      type: boolean
      description: True when the diff was cut at 256 KiB.
"""


@builtin("git_diff", DIFF_SPEC)
async def git_diff(call: BuiltinContext) -> dict[str, Any]:
    """Unified diff."""
    staged = ("--cached",) if call.inputs["staged"] else ()
    data = await git(call, "diff", "--no-color", "--no-ext-diff", *staged)
    truncated = len(data) > MAX_DIFF_BYTES
    text = data[:MAX_DIFF_BYTES].decode(errors="replace")
    if truncated:
        text += f"\n[diff truncated at {MAX_DIFF_BYTES // 1024} KiB of {len(data)} bytes]\n"
    return {"diff": text, "truncated": truncated}


# --- git_commit -------------------------------------------------------------------------

COMMIT_SPEC = """
spec:
  description: >-
    Commit every change in the work tree (git add -A, then git commit) with the given
    message and author. Trailers such as "Co-authored-by: Name <email>" are appended
    after a blank line, as git interpret-trailers does. Fails when nothing changed.
  inputs:
    message:
      type: string
      description: The commit message; the first line is the subject.
    author_name:
      type: string
      description: Author (and committer) name.
    author_email:
      type: string
      description: Author (and committer) email.
    trailers:
      type: array
      default: []
      description: >-
        Trailer lines "Token: value", e.g. "Co-authored-by: A <a@example.com>".
  outputs:
    commit:
      type: string
      description: The new commit's SHA.
    branch:
      type: string
      description: The branch committed to; empty when HEAD is detached.
"""


def _identity(call: BuiltinContext) -> dict[str, str]:
    name, email = call.text("author_name").strip(), call.text("author_email").strip()
    if not name or any(c in name for c in "<>\n"):
        raise BuiltinError(
            "invalid_argument", "author_name must be non-empty, without <, > or newlines"
        )
    if not re.fullmatch(r"[^<>\s@]+@[^<>\s@]+", email):
        raise BuiltinError("invalid_argument", f"author_email {email!r} is not an email address")
    return {
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_COMMITTER_NAME": name,
        "GIT_COMMITTER_EMAIL": email,
    }


def _trailer_args(trailers: Any) -> list[str]:
    args: list[str] = []
    for trailer in trailers:
        if not isinstance(trailer, str) or not _TRAILER.match(trailer) or "\n" in trailer:
            raise BuiltinError(
                "invalid_argument",
                f'trailer {trailer!r} must be one line "Token: value", '
                'e.g. "Co-authored-by: Ada <ada@example.com>"',
            )
        args += ["--trailer", trailer]
    return args


@builtin("git_commit", COMMIT_SPEC)
async def git_commit(call: BuiltinContext) -> dict[str, Any]:
    """Commit everything."""
    message = call.text("message")
    if not message.strip():
        raise BuiltinError("invalid_argument", "message is empty; describe the change")
    identity = _identity(call)
    trailers = _trailer_args(call.inputs["trailers"])
    await git(call, "add", "-A")
    if await _succeeds(call, "diff", "--cached", "--quiet"):
        raise BuiltinError("failed_precondition", "nothing to commit: the work tree is clean")
    await git(call, "commit", "-q", "--no-edit", "-m", message, *trailers, env=identity)
    commit = (await git(call, "rev-parse", "HEAD")).decode().strip()
    return {"commit": commit, "branch": await current_branch(call)}


# --- git_branch -------------------------------------------------------------------------

BRANCH_SPEC = """
spec:
  description: >-
    Switch to a branch, creating it from the current commit when it does not exist.
    Uncommitted changes are carried over (git switch refuses if they would be lost).
  inputs:
    name:
      type: string
      description: Branch name, e.g. "forgehand/issue-123".
  outputs:
    branch:
      type: string
      description: The branch now checked out.
    created:
      type: boolean
      description: True when the branch was created by this call.
"""


@builtin("git_branch", BRANCH_SPEC)
async def git_branch(call: BuiltinContext) -> dict[str, Any]:
    """Create or switch to a branch."""
    name = call.text("name")
    if name.startswith("-") or not await _succeeds(call, "check-ref-format", "--branch", name):
        raise BuiltinError("invalid_argument", f"{name!r} is not a valid branch name")
    exists = await _succeeds(call, "rev-parse", "--verify", "-q", f"refs/heads/{name}")
    await git(call, "switch", "-q", *(() if exists else ("-c",)), name)
    return {"branch": name, "created": not exists}


# --- git_bundle -------------------------------------------------------------------------

BUNDLE_SPEC = """
spec:
  description: >-
    Write a git bundle of the current branch to a file: all of its history, or with base
    only the commits since base (a commit, tag or branch). Fails when there is nothing to
    bundle.
  inputs:
    path:
      type: string
      description: Bundle file to write, relative to the work dir.
    base:
      type: string
      default: ""
      description: Leave out commits reachable from this revision; empty for the full history.
  outputs:
    path:
      type: string
      description: The bundle written, relative to the work dir.
    branch:
      type: string
      description: The branch bundled.
    commit:
      type: string
      description: The SHA the branch points at.
"""


async def _revision(call: BuiltinContext, revision: str) -> str:
    if revision.startswith("-"):
        raise BuiltinError("invalid_argument", f"base {revision!r} is not a revision")
    result = await _git(call, ("rev-parse", "--verify", "-q", f"{revision}^{{commit}}"), {})
    if result.exit_code != 0:
        raise BuiltinError("not_found", f"base {revision!r} is not a commit in this repository")
    return result.stdout.decode().strip()


@builtin("git_bundle", BUNDLE_SPEC)
async def git_bundle(call: BuiltinContext) -> dict[str, Any]:
    """Bundle the current branch."""
    path = await call.path("path")
    branch = await current_branch(call)
    if not branch:
        raise BuiltinError("failed_precondition", "HEAD is detached; switch to a branch first")
    base = call.text("base")
    exclude = (f"^{await _revision(call, base)}",) if base else ()
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    await git(call, "bundle", "create", "-q", str(path), f"refs/heads/{branch}", *exclude)
    commit = (await git(call, "rev-parse", f"refs/heads/{branch}")).decode().strip()
    return {"path": call.confinement.display(path), "branch": branch, "commit": commit}


BUILTINS: tuple[Builtin, ...] = (git_status, git_diff, git_commit, git_branch, git_bundle)
