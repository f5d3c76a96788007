"""A sandbox with the repository in it: seeding, setup, and taking the result out.

The checkout is cloned from the host's mirror into the work dir on the host (no
credential involved), handed to the sandbox's own user, and the repository's setup
commands run in it. The result leaves as a git bundle made by the runner's
`builtin://git_bundle` step; the host verifies it with `git bundle verify` against the
mirror and fetches it into the mirror. Nothing of the sandbox's `.git` (config, hooks) is
ever used on the host: the bundle file is the only thing read.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgehand.agent.step_tools import STEP_CACHE
from forgehand.agent.workspace import GitError
from forgehand.agent.workspaces import Workspace, give_to_owner_of, open_workspace, scratch_dir
from forgehand.runner.model import RunSpec
from forgehand.sandbox.spec import NetworkPolicy
from forgehand.workflow.mirror import Mirror, result_ref, seed_checkout
from forgehand.workflow.model import Outcome, RunEnded

BUNDLE_PATH = ".git/forgehand-result.bundle"
SETUP_TIMEOUT_S = 1800.0
_HARNESS_GIT = ("git", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false")


@dataclass(frozen=True)
class Session:
    """A live workspace whose `repo` directory holds the checkout."""

    space: Workspace
    scratch: Path

    @property
    def repo_host(self) -> Path:
        return self.space.host_dir / "repo"

    @property
    def repo_dir(self) -> str:
        return posixpath.join(self.space.sandbox_dir, "repo")

    @property
    def step_cache(self) -> tuple[Path, str]:
        """Where the git steps of repository tools are staged, as host and sandbox see it
        (beside the checkout, so never part of its diff)."""
        return (
            self.space.host_dir / STEP_CACHE,
            posixpath.join(self.space.sandbox_dir, STEP_CACHE),
        )

    @property
    def client(self) -> Any:
        return self.space.client

    async def run_script(self, script: str, timeout_s: float) -> tuple[bool, str]:
        spec = RunSpec(
            script=script,
            interpreter="bash",
            cwd=self.repo_dir,
            env=self.space.env,
            timeout_seconds=timeout_s,
            max_output_bytes=4 * 1024 * 1024,
        )
        result = await self.space.client.run(spec)
        return result.ok, (result.stdout + result.stderr).decode("utf-8", "replace")

    async def harness_git(self, *args: str) -> tuple[bool, str]:
        """git in the sandbox with hooks and fsmonitor off (the agent may have set them)."""
        spec = RunSpec(
            argv=(*_HARNESS_GIT, *args),
            cwd=self.repo_dir,
            env=self.space.env,
            timeout_seconds=300.0,
        )
        result = await self.space.client.run(spec)
        return result.ok, (result.stdout + result.stderr).decode("utf-8", "replace")

    async def step(self, ref: str, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run a built-in step in the checkout; its result tree (status, outputs, error)."""
        spec = RunSpec(
            step=ref,
            step_inputs=inputs,
            step_work_dir=self.repo_dir,
            env=self.space.env,
            timeout_seconds=600.0,
        )
        result = await self.space.client.run(spec)
        return result.step_result or {
            "status": "failed",
            "error": result.stderr.decode("utf-8", "replace")[-2000:] or "no step result",
        }


@contextlib.asynccontextmanager
async def open_session(
    kind: str,
    mirror: Mirror,
    commit: str,
    *,
    path_prefix: Sequence[str] = (),
    network: NetworkPolicy | None = None,
    root: dict[str, str] | None = None,
) -> AsyncIterator[Session]:
    """A new sandbox with `commit` checked out on the default branch in `repo/`, on the
    host's root file system or on `root` (see `open_workspace`)."""
    async with (
        scratch_dir("fh-run-") as scratch,
        open_workspace(kind, scratch, path_prefix=path_prefix, network=network, root=root) as space,
    ):
        session = Session(space, scratch)
        if root is not None and root.get("type", "host") != "host":
            await check_root_tools(space, root)
        await seed_checkout(mirror, session.repo_host, commit)
        await asyncio.to_thread(give_to_owner_of, space.host_dir, session.repo_host)
        yield session


async def check_root_tools(space: Workspace, root: dict[str, str]) -> None:
    """Refuse a root file system that lacks what the run itself needs: bash (setup and
    test commands run in it) and git (the result is committed and bundled in the sandbox)."""
    result = await space.client.run(
        RunSpec(
            argv=("bash", "-c", "command -v git"),
            cwd=space.sandbox_dir,
            env=space.env,
            timeout_seconds=60.0,
        )
    )
    if result.ok:
        return
    what = f"the image {root['name']!r}" if "name" in root else f"the root {root.get('path')!r}"
    found = (result.stdout + result.stderr).decode("utf-8", "replace").strip()
    raise RunEnded(
        Outcome.SETUP_FAILED,
        f"{what} lacks bash or git, which every run needs (setup and test commands run in "
        "bash; the result is committed and bundled with git in the sandbox): add both to it",
        output=found[-3000:],
    )


async def run_setup(session: Session, commands: Sequence[str]) -> list[dict[str, Any]]:
    """Run the repository's setup commands in order; the first failure ends the run."""
    done = []
    for command in commands:
        ok, output = await session.run_script(command, SETUP_TIMEOUT_S)
        if not ok:
            denied = await asyncio.to_thread(session.space.denials)
            if denied:
                raise RunEnded(
                    Outcome.BLOCKED_NETWORK,
                    f"the setup command `{command}` failed after the sandbox was refused "
                    f"network access to {', '.join(denied)}: {_network_remedy(denied)}",
                    output=output[-3000:],
                )
            raise RunEnded(
                Outcome.SETUP_FAILED,
                f"the setup command `{command}` failed: fix it in .forgehand/config.yml",
                output=output[-3000:],
            )
        done.append({"command": command, "ok": ok})
    return done


def _network_remedy(denied: dict[str, str]) -> str:
    """What to change in .forgehand/config.yml, given each refused host's reason."""
    from forgehand.sandbox.egress.policy import READ_ONLY_REFUSAL

    if any(reason.startswith(READ_ONLY_REFUSAL) for reason in denied.values()):
        return (
            "the network is read-only (`network.read_only: true` in .forgehand/config.yml "
            "lets only GET, HEAD and OPTIONS through, over plain http, so https is refused): "
            "turn it off if the setup needs https or uploads"
        )
    return "if the project needs them, add them to `network.allow` in .forgehand/config.yml"


async def commit_in_sandbox(session: Session, message: str, trailers: list[str]) -> str | None:
    """Commit every change as the bot (git_commit step); None when nothing changed."""
    from forgehand.workflow.texts import BOT_EMAIL, BOT_NAME

    result = await session.step(
        "builtin://git_commit",
        {
            "message": message,
            "author_name": BOT_NAME,
            "author_email": BOT_EMAIL,
            "trailers": trailers,
        },
    )
    if result.get("status") == "succeeded":
        return str(result["outputs"]["commit"])
    error = str(result.get("error") or "")
    if "nothing to commit" in error:
        return None
    raise RunEnded(Outcome.SANDBOX_FAULT, f"committing in the sandbox failed: {error}")


async def extract_bundle(session: Session, mirror: Mirror, base: str, run_id: str) -> str:
    """Bundle the commits since `base`, verify the bundle on the host, fetch it into the mirror.

    Returns the result commit, kept in the mirror at `result_ref(run_id)`.
    """
    result = await session.step("builtin://git_bundle", {"path": BUNDLE_PATH, "base": base})
    if result.get("status") != "succeeded":
        raise RunEnded(Outcome.SANDBOX_FAULT, f"bundling the result failed: {result.get('error')}")
    branch = str(result["outputs"]["branch"])
    data = await session.client.read_file(posixpath.join(session.repo_dir, BUNDLE_PATH))
    bundle = session.scratch / "result.bundle"
    await asyncio.to_thread(bundle.write_bytes, data)
    try:
        await mirror.git("bundle", "verify", "--quiet", str(bundle))
        await mirror.git(
            "fetch",
            "--quiet",
            "--no-tags",
            str(bundle),
            f"+refs/heads/{branch}:{result_ref(run_id)}",
        )
    except GitError as exc:
        raise RunEnded(Outcome.SANDBOX_FAULT, f"the result bundle is not usable: {exc}") from None
    return await mirror.git("rev-parse", result_ref(run_id))


async def diff_changes(mirror: Mirror, base: str, commit: str) -> list[tuple[str, str]]:
    """(status letter, path) of every path changed from `base` to `commit`."""
    out = await mirror.git("diff", "--no-renames", "--name-status", base, commit)
    pairs = [line.split("\t", 1) for line in out.splitlines() if "\t" in line]
    return [(status[0], path) for status, path in pairs]
