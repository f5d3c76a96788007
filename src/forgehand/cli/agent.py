"""``forgehand agent run``: the command's arguments. The work is in ``agent_run`` and is
imported only when the command runs (the provider SDKs take seconds to import)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from forgehand.cli.solve import add_root

SANDBOXES = ("none", "bwrap", "gvisor", "podman")


def register(commands: Any) -> None:
    agent = commands.add_parser("agent", help="run the coding agent")
    sub = agent.add_subparsers(dest="agent_command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="work on a task in a copy of a local checkout")
    run.add_argument("--repo", type=Path, required=True, help="a local git checkout")
    run.add_argument("--task", required=True, help="the task; its first line is the title")
    run.add_argument("--provider", choices=("anthropic", "openai"), help="default anthropic")
    run.add_argument("--model", help="model name as the provider spells it")
    run.add_argument("--base-url", help="provider API root (a proxy or compatible server)")
    run.add_argument("--config", type=Path, help="provider configuration file (YAML/JSON)")
    run.add_argument("--sandbox", choices=SANDBOXES, default="none", help="default none")
    run.add_argument("--max-steps", type=int, default=50, help="model calls (default 50)")
    run.add_argument("--max-cost", type=float, help="USD, at the configured prices")
    run.add_argument("--max-tokens", type=int, help="input + output tokens")
    run.add_argument("--max-seconds", type=float, help="wall time")
    run.add_argument(
        "--yield-after",
        type=float,
        default=20.0,
        metavar="S",
        help="hand a still-running command back to the model after S seconds (default 20)",
    )
    add_root(run)
    run.add_argument("--trajectory", type=Path, help="JSONL file (default in the repo's .git)")
    run.add_argument(
        "--secret-env",
        action="append",
        default=[],
        metavar="NAME",
        help="mask the value of this environment variable in the trajectory (repeatable)",
    )
    run.set_defaults(handler=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    from forgehand.cli.agent_run import run_command

    return run_command(args)
