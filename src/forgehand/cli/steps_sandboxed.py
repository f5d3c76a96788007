"""``forgehand steps run --sandbox bwrap|gvisor|podman``: a step run inside a sandbox.

The work dir's files are copied into the sandbox's work dir, and so is a local step's
directory (so its relative references still resolve). The step runs through the sandbox's
runner as a step run; its output streams here, then its outputs print as JSON. Git step
references are refused for now: they are to be fetched on the trusted side, and a
sandbox has no network to fetch them itself.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import shutil
import sys
from pathlib import Path
from typing import Any

from forgehand.agent.workspaces import WorkspaceError, give_to_owner_of, open_workspace, scratch_dir
from forgehand.runner import errors
from forgehand.runner.model import Exited, Output, RunSpec, StepEvent, StepEventKind, Stream

STEP_DIR = ".forgehand-step"
EXIT_FAILED, EXIT_USAGE = 1, 2


def refused_reference(ref: str) -> str | None:
    """Why this reference cannot run in a sandbox yet, or None."""
    if ref.startswith("builtin://") or Path(ref).exists():
        return None
    return (
        "git step references cannot run in a sandbox yet (they are to be fetched on the "
        "trusted side): vendor the step into a directory and pass its path"
    )


async def run_in_sandbox(kind: str, ref: str, inputs: dict[str, Any], work_dir: Path) -> int:
    try:
        async with scratch_dir("fh-step-") as scratch, open_workspace(kind, scratch) as space:
            sandbox_ref = await asyncio.to_thread(_stage, ref, work_dir, space.host_dir)
            if sandbox_ref is not None:
                ref = posixpath.join(space.sandbox_dir, sandbox_ref)
            await asyncio.to_thread(give_to_owner_of, space.host_dir, space.host_dir)
            spec = RunSpec(
                step=ref,
                step_inputs=inputs,
                step_work_dir=space.sandbox_dir,
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


def _stage(ref: str, work_dir: Path, target: Path) -> str | None:
    """Copy the work dir (and a local step) into the sandbox's work dir; the step's path
    relative to it, or None for a built-in."""
    shutil.copytree(work_dir, target, dirs_exist_ok=True, symlinks=True)
    if ref.startswith("builtin://"):
        return None
    step = Path(ref)
    source = step if step.is_dir() else step.parent
    shutil.copytree(source, target / STEP_DIR, dirs_exist_ok=True, symlinks=True)
    return STEP_DIR if step.is_dir() else posixpath.join(STEP_DIR, step.name)


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
