"""``forgehand steps run --sandbox bwrap|gvisor|podman``: a step run inside a sandbox.

The work dir's files are copied into the sandbox's work dir, and so is a local step's
directory (so its relative references still resolve). Git step references, the step's own
or any step's it references, are fetched here on the trusted side and staged into the
sandbox (``forgehand.steps.prefetch``): a sandbox has no network to fetch them itself. The
step runs through the sandbox's runner as a step run; its output streams here, then its
outputs print as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import shutil
import sys
from pathlib import Path
from typing import Any

from forgehand.agent.step_tools import STEP_CACHE
from forgehand.agent.workspaces import WorkspaceError, give_to_owner_of, open_workspace, scratch_dir
from forgehand.runner import errors
from forgehand.runner.model import Exited, Output, RunSpec, StepEvent, StepEventKind, Stream
from forgehand.steps.errors import StepError
from forgehand.steps.prefetch import default_cache_dir, prefetch, stage

STEP_DIR = ".forgehand-step"
EXIT_FAILED, EXIT_USAGE = 1, 2


async def run_in_sandbox(kind: str, ref: str, inputs: dict[str, Any], work_dir: Path) -> int:
    """Run ``ref`` (an absolute step path, ``builtin://NAME`` or ``URL@REV``) in a new
    sandbox of ``kind`` over a copy of ``work_dir``; the exit code for the CLI."""
    local = _local_source(ref)
    try:
        checkouts = await prefetch(ref, local or work_dir, default_cache_dir())
    except StepError as exc:
        print(f"forgehand: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        async with scratch_dir("fh-step-") as scratch, open_workspace(kind, scratch) as space:
            await asyncio.to_thread(_stage, work_dir, local, space.host_dir, checkouts)
            if local is not None:
                inside = posixpath.join(space.sandbox_dir, STEP_DIR)
                ref = posixpath.join(inside, Path(ref).relative_to(local).as_posix())
            await asyncio.to_thread(give_to_owner_of, space.host_dir, space.host_dir)
            spec = RunSpec(
                step=ref,
                step_inputs=inputs,
                step_work_dir=space.sandbox_dir,
                step_cache_dir=posixpath.join(space.sandbox_dir, STEP_CACHE),
                cwd=space.sandbox_dir,
                env=space.env,
            )
            return await _follow(space.client, spec)
    except WorkspaceError as exc:
        print(f"forgehand: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except errors.RunnerError as exc:
        print(f"forgehand: the sandbox's runner failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _local_source(ref: str) -> Path | None:
    """The directory a local step is copied from (a step directory, or a step file's
    directory); None for ``builtin://`` and git references."""
    if ref.startswith("builtin://") or not os.path.isabs(ref):
        return None
    step = Path(ref)
    return step if step.is_dir() else step.parent


def _stage(work_dir: Path, local: Path | None, target: Path, checkouts: list[Path]) -> None:
    """Copy the work dir, a local step's directory and the fetched git steps into the
    sandbox's work dir."""
    shutil.copytree(work_dir, target, dirs_exist_ok=True, symlinks=True)
    if local is not None:
        shutil.copytree(local, target / STEP_DIR, dirs_exist_ok=True, symlinks=True)
    stage(checkouts, target / STEP_CACHE)


async def _follow(client: Any, spec: RunSpec) -> int:
    result: dict[str, Any] | None = None
    exited: Exited | None = None
    run_id = await client.start(spec)
    async for event in client.attach(run_id):
        if isinstance(event, Output):
            sink = sys.stderr.buffer if event.stream is Stream.STDERR else sys.stdout.buffer
            sink.write(event.data)
            sink.flush()
        elif isinstance(event, StepEvent) and event.kind is StepEventKind.RESULT:
            result = event.result
        elif isinstance(event, Exited):
            exited = event
    outputs = (result or {}).get("outputs") or {}
    print(json.dumps(outputs, indent=2, sort_keys=True))
    if exited is None or not exited.ok:
        error = (result or {}).get("error") or (exited.message if exited else "no exit")
        print(f"forgehand: step {(result or {}).get('status', 'failed')}: {error}", file=sys.stderr)
        return EXIT_FAILED
    return 0
