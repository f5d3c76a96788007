"""What the daemon asks its keeper to spawn: a ``StartRequest`` digested into a
``KeeperStart``.

The keeper is a small compiled program (``keeper.c``) that only spawns, pumps and
journals. Everything that takes Python or knowledge of the runner is done here, in the
daemon, once the request has passed ``core.validate_start``:

- the argv of a script run (``interpreter -c source``) and of a step run (the step engine,
  started as ``python -m`` stands in this sandbox: ``python_m``);
- the run's environment, with ``PATH`` and, on a terminal, ``TERM`` defaulted;
- a step run's request to the engine (JSON on its stdin) and its event pipe (fd 3);
- the terminal's size and the limits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner.keeper_launch import python_m

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_TERM = "xterm-256color"
DEFAULT_PTY_ROWS = 24
DEFAULT_PTY_COLS = 80
STEP_ENGINE = "forgehand.steps.engine"


def digest(request: pb.StartRequest, state_dir: Path, roots: Sequence[str]) -> pb.KeeperStart:
    """The keeper's start request for a validated ``request``. ``roots``: the daemon's file
    roots (a step runs in the first unless the request says otherwise)."""
    env = dict(request.env)
    env.setdefault("PATH", DEFAULT_PATH)
    if request.pty:
        env.setdefault("TERM", DEFAULT_TERM)
    start = pb.KeeperStart(
        run_id=request.run_id,
        request=request.SerializeToString(),
        env=[f"{name}={value}" for name, value in env.items()],
        cwd=request.cwd,
        pty=request.pty,
        pty_rows=request.pty_size.rows or DEFAULT_PTY_ROWS,
        pty_cols=request.pty_size.cols or DEFAULT_PTY_COLS,
        stdin_pipe=request.stdin == pb.STDIN_MODE_PIPE,
        timeout_seconds=request.timeout_seconds,
        cancel_grace_seconds=request.cancel_grace_seconds,
        max_output_bytes=request.limits.max_output_bytes,
        journal_max_bytes=request.limits.journal_max_bytes,
    )
    work = request.WhichOneof("work")
    if work == "step":
        start.argv.extend([*python_m(), STEP_ENGINE])
        start.stdin = _step_request(request, env, state_dir, roots)
        start.stdin_pipe = start.stdin_close = start.step_events = True
    elif work == "script":
        start.argv.extend([request.script.interpreter or "/bin/sh", "-c", request.script.source])
    else:
        start.argv.extend(request.argv.args)
    return start


def _step_request(
    request: pb.StartRequest, env: dict[str, str], state_dir: Path, roots: Sequence[str]
) -> bytes:
    """The JSON request the step engine reads on its stdin."""
    step = request.step
    body = {
        "ref": step.ref,
        "inputs": json.loads(step.inputs_json or "{}"),
        "env": env,
        "work_dir": step.work_dir or request.cwd or (*roots, "/")[0],
        "cache_dir": step.cache_dir or str(state_dir / "step-cache"),
        "prefetched": bool(step.cache_dir),
        "roots": list(roots),
    }
    return json.dumps(body).encode()
