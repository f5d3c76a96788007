"""``forgehand solve ISSUE``, ``forgehand runs`` and ``forgehand show RUN``.

``solve`` runs the whole workflow for one issue in this process, with live progress on
stderr: a GitLab or GitHub issue URL (token from GITLAB_TOKEN / GITHUB_TOKEN) or
``local:PATH#N``. Exit status: 0 done, 1 the run ended for another reason (it says which),
2 the run could not start. The model is live: the provider key comes from
ANTHROPIC_API_KEY / OPENAI_API_KEY or ``--config``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from forgehand.cli.local import add_home

SANDBOXES = ("auto", "none", "bwrap", "gvisor", "podman")


def add_sandbox(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sandbox",
        choices=SANDBOXES,
        default="auto",
        help="auto (default): bubblewrap, and fail if it is unusable; none: no isolation",
    )


def add_root(parser: argparse.ArgumentParser) -> None:
    """``--rootfs DIR`` | ``--image NAME``: the sandbox's root file system (see `chosen_root`)."""
    roots = parser.add_mutually_exclusive_group()
    roots.add_argument(
        "--rootfs",
        type=Path,
        metavar="DIR",
        help="with a sandbox: run on this root filesystem's programs (an unpacked image)",
    )
    roots.add_argument(
        "--image",
        metavar="NAME",
        help="with a sandbox: run on a container image in podman's local store (never pulled)",
    )


def chosen_root(args: argparse.Namespace) -> dict[str, str] | None:
    """The root `add_root`'s options ask for, as a spec's root (None: the host's)."""
    from forgehand.agent.workspaces import WorkspaceError

    if args.rootfs is None and args.image is None:
        return None
    if args.sandbox == "none":
        raise WorkspaceError("--rootfs and --image need a sandbox: add --sandbox bwrap")
    if args.image is not None:
        return {"type": "image", "name": args.image}
    return {"type": "dir", "path": str(args.rootfs.absolute())}


def register(commands: Any) -> None:
    solve = commands.add_parser("solve", help="turn an issue into a tested draft MR")
    solve.add_argument("issue", help="issue URL (GitLab, GitHub) or local:PATH#N")
    solve.add_argument("--requester", help="user who asked (default: the issue's author)")
    solve.add_argument("--provider", choices=("anthropic", "openai"), help="default anthropic")
    solve.add_argument("--model", help="model name as the provider spells it")
    solve.add_argument("--base-url", help="provider API root (a proxy or compatible server)")
    solve.add_argument("--config", type=Path, help="provider configuration file (YAML/JSON)")
    solve.add_argument("--forge-url", help="forge API URL (default: derived from the issue URL)")
    add_sandbox(solve)
    add_root(solve)
    solve.add_argument(
        "--allow-image",
        action="append",
        default=[],
        metavar="PATTERN",
        help="a local image a repository may name as `image` in .forgehand/config.yml "
        "(shell pattern, e.g. 'node:*'; repeatable; default: none)",
    )
    solve.add_argument("--max-steps", type=int, default=50, help="model calls (default 50)")
    solve.add_argument("--max-cost", type=float, help="USD, at the configured prices")
    solve.add_argument("--max-tokens", type=int, help="input + output tokens")
    solve.add_argument("--max-seconds", type=float, help="wall time of the agent")
    add_home(solve)
    solve.set_defaults(handler=_solve)

    runs = commands.add_parser("runs", help="list workflow runs")
    runs.add_argument("--json", action="store_true", help="JSON lines")
    runs.add_argument("--limit", type=int, default=50)
    add_home(runs)
    runs.set_defaults(handler=_runs)

    show = commands.add_parser("show", help="show one workflow run")
    show.add_argument("run", help="run id (see forgehand runs)")
    show.add_argument("--json", action="store_true", help="the whole record as JSON")
    add_home(show)
    show.set_defaults(handler=_show)


def _solve(args: argparse.Namespace) -> int:
    from forgehand.workflow.commands import solve_command

    return solve_command(args)


def _runs(args: argparse.Namespace) -> int:
    from forgehand.workflow.commands import runs_command

    return runs_command(args)


def _show(args: argparse.Namespace) -> int:
    from forgehand.workflow.commands import show_command

    return show_command(args)
