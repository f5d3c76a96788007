"""``forgehand steps check|list|run``: check step files, list agent tools, run a step.

``check`` prints ``file:line:col: message`` per problem and exits 1 if there is any.
``list`` prints the tool definitions the agent would see (every built-in plus the
repository's ``.forgehand/steps/``); a broken repository step is reported on stderr and
left out. ``run`` executes a step here with the step engine, prints its output as it
comes and then its outputs as JSON; it exits 0 when the step succeeded, 1 when it failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

SANDBOXES = ("none", "bwrap", "gvisor", "podman")
EXIT_FAILED = 1
EXIT_USAGE = 2


def register(commands: Any) -> None:
    steps = commands.add_parser("steps", help="check, list and run steps (agent tools)")
    sub = steps.add_subparsers(dest="steps_command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="check step files; file:line:col: message per problem")
    check.add_argument("files", nargs="+", metavar="FILE", help="step file or directory")
    check.set_defaults(handler=_check)

    listing = sub.add_parser("list", help="list the tools the agent would see")
    listing.add_argument("--repo", type=Path, help="repository whose .forgehand/steps/ to add")
    listing.add_argument("--json", action="store_true", help="print tool definitions as JSON")
    listing.set_defaults(handler=_list)

    run = sub.add_parser("run", help="run a step and print its outputs as JSON")
    run.add_argument("ref", metavar="FILE_OR_REF", help="step file, builtin://NAME or URL@REV")
    run.add_argument(
        "--input",
        "-i",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an input; VALUE is parsed as JSON when it parses, else taken as a string",
    )
    run.add_argument("--work-dir", type=Path, default=Path.cwd(), help="default: current dir")
    run.add_argument("--sandbox", choices=SANDBOXES, default="none", help="default: none")
    run.set_defaults(handler=_run)


# --- check ------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    from forgehand.steps.builtins import BuiltinCatalog
    from forgehand.steps.checker import check_files
    from forgehand.steps.prefetch import default_cache_dir
    from forgehand.steps.references import GitFetcher

    fetcher = GitFetcher(default_cache_dir(), local=True)
    diagnostics = check_files(args.files, fetcher=fetcher, builtins=BuiltinCatalog())
    for diagnostic in diagnostics:
        print(diagnostic)
    return EXIT_FAILED if diagnostics else 0


# --- list -------------------------------------------------------------------------------


def tool_definitions(repo: Path | None) -> list[dict[str, Any]]:
    """Every built-in's tool definition, then the repository's; problems go to stderr."""
    from forgehand.steps.builtins import all_builtins
    from forgehand.steps.tools import discover_tool_steps, tool_definition

    tools = [tool_definition(b.spec, b.name) for b in all_builtins()]
    if repo is None:
        return tools
    builtin_names = {tool["name"] for tool in tools}
    found = discover_tool_steps(repo)
    for diagnostic in found.diagnostics:
        print(f"skipped: {diagnostic}", file=sys.stderr)
    for tool in found.tools:
        if tool.name in builtin_names:
            print(
                f"skipped: {tool.step.path}: tool name {tool.name!r} is a built-in; rename it",
                file=sys.stderr,
            )
            continue
        tools.append(tool.definition)
    return tools


def _list(args: argparse.Namespace) -> int:
    if args.repo is not None and not args.repo.is_dir():
        print(f"forgehand: --repo {args.repo} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    tools = tool_definitions(args.repo)
    if args.json:
        print(json.dumps(tools, indent=2))
    else:
        for tool in tools:
            print(f"{tool['name']}: {tool['description'].splitlines()[0]}")
    return 0


# --- run --------------------------------------------------------------------------------


def parse_inputs(items: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs; VALUE is JSON when it parses as JSON, else a string."""
    inputs: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--input takes NAME=VALUE, got {item!r}")
        try:
            inputs[name] = json.loads(text)
        except json.JSONDecodeError:
            inputs[name] = text
    return inputs


def _ref(text: str) -> str:
    """A file path made absolute; references (builtin://, URL@REV) as they are."""
    if text.startswith("builtin://") or ("@" in text and not Path(text).exists()):
        return text
    return str(Path(text).resolve())


class _ConsoleSink:
    """Step output to our stdout/stderr as it comes; events are not shown."""

    def output(self, stream: str, data: bytes) -> None:
        target = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
        target.write(data)
        target.flush()

    def event(self, event: dict[str, Any]) -> None:
        del event


def _run(args: argparse.Namespace) -> int:
    try:
        inputs = parse_inputs(args.input)
    except ValueError as exc:
        print(f"forgehand: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.work_dir.is_dir():
        print(f"forgehand: --work-dir {args.work_dir} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    if args.sandbox != "none":
        from forgehand.cli.steps_sandboxed import run_in_sandbox

        return asyncio.run(run_in_sandbox(args.sandbox, _ref(args.ref), inputs, args.work_dir))
    return asyncio.run(_execute(_ref(args.ref), inputs, args.work_dir))


async def _execute(ref: str, inputs: dict[str, Any], work_dir: Path) -> int:
    from forgehand.steps.engine import StepEngine
    from forgehand.steps.prefetch import default_cache_dir
    from forgehand.steps.results import StepStatus

    engine = StepEngine(
        work_dir=work_dir,
        sink=_ConsoleSink(),
        cache_dir=default_cache_dir() if os.environ.get("HOME") else tempfile.gettempdir(),
    )
    result = await engine.run(ref, inputs)
    sys.stdout.flush()
    print(json.dumps(dict(result.outputs), indent=2, sort_keys=True))
    if result.status is not StepStatus.SUCCEEDED:
        print(f"forgehand: step {result.status.value}: {result.error}", file=sys.stderr)
        return EXIT_FAILED
    return 0
