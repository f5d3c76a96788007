"""What a run inside any sandbox gets by default: environment, working dir and limits.

The runner gives a run exactly the environment its ``RunSpec`` names (nothing from the
sandbox or the runner leaks in). So the environment a sandbox's runs should see — the
spec's ``env`` plus, for ``network: proxy``, the variables that point tools at the
in-sandbox forwarder — is built here and **merged into every RunSpec made with**
``run_spec``; a caller who builds a ``RunSpec`` by hand merges ``run_environment(spec)``
itself (bwrap sandboxes also expose it as ``sandbox.run_env``).

Backend-neutral: every backend lays the sandbox out the same way (work dir at
``spec.work_dir.sandbox_path``, forwarder on 127.0.0.1:3128, decision log below).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from forgehand.runner.model import RunSpec
from forgehand.sandbox.egress.env import proxy_environment
from forgehand.sandbox.spec import ProxyNetwork, SandboxSpec

EGRESS_LOG = "/run/forgehand/egress-decisions.jsonl"
"""Where the proxy's decision log appears (read-only) inside a sandbox with network: proxy."""
CANCEL_GRACE_SECONDS = 1.0


def run_environment(spec: SandboxSpec) -> dict[str, str]:
    """Neutral defaults, the proxy variables (network: proxy), then the spec's own env."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(spec.work_dir.sandbox_path),
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "PIP_CONFIG_FILE": "/dev/null",
    }
    if isinstance(spec.network, ProxyNetwork):
        env |= proxy_environment() | {"FORGEHAND_EGRESS_LOG": EGRESS_LOG}
    return env | spec.env


def run_spec(
    spec: SandboxSpec,
    argv: Sequence[str] = (),
    *,
    env: dict[str, str] | None = None,
    timeout_seconds: float | None = None,
    **fields: Any,
) -> RunSpec:
    """A RunSpec with the sandbox's defaults: cwd = the work dir, ``run_environment`` plus
    ``env``, output capped at ``limits.output_bytes``, timeout ``limits.wall_time_seconds``.
    Further ``RunSpec`` fields (``script``, ``stdin``, ``pty``…) pass through."""
    defaults: dict[str, Any] = {
        "cwd": str(spec.work_dir.sandbox_path),
        "max_output_bytes": spec.limits.output_bytes,
        "cancel_grace_seconds": CANCEL_GRACE_SECONDS,
    }
    timeout = spec.limits.wall_time_seconds if timeout_seconds is None else timeout_seconds
    return RunSpec(
        argv=tuple(argv),
        env=run_environment(spec) | (env or {}),
        timeout_seconds=timeout,
        **(defaults | fields),
    )
