"""``forgehand trajectory show FILE``: an agent run's trajectory, rendered for a person."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from forgehand.agent.trajectory import read_trajectory

Renderer = Callable[[dict[str, Any], int], list[str]]


def register(commands: Any) -> None:
    if "trajectory" in commands.choices:  # registered already (by `forgehand.cli.agent`)
        return
    trajectory = commands.add_parser("trajectory", help="inspect agent trajectories")
    sub = trajectory.add_subparsers(dest="trajectory_command", required=True, metavar="COMMAND")
    show = sub.add_parser("show", help="render a trajectory JSONL file")
    show.add_argument("file", type=Path)
    show.add_argument(
        "--width", type=int, default=2000, help="characters of each output to show (default 2000)"
    )
    show.set_defaults(handler=_show)


def _show(args: argparse.Namespace) -> int:
    try:
        records = list(read_trajectory(args.file))
    except OSError as exc:
        print(f"forgehand trajectory: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    sys.stdout.write("\n".join(render(records, args.width)) + "\n")
    return 0


def render(records: Iterable[dict[str, Any]], width: int = 2000) -> list[str]:
    """The lines of a human-readable view of `records`."""
    lines: list[str] = []
    for record in records:
        renderer = _RENDERERS.get(str(record.get("type")), _unknown)
        lines.extend(renderer(record, width))
    return lines


def _start(record: dict[str, Any], width: int) -> list[str]:
    budgets = ", ".join(f"{k}={v}" for k, v in record.get("budgets", {}).items() if v is not None)
    return [
        f"═══ run started {record.get('time', '')} · provider {record.get('provider')}",
        f"budgets: {budgets or 'none'}",
        f"tools: {', '.join(record.get('tools', []))}",
        "── task",
        *_indent(_clip(str(record.get("task", "")), width)),
    ]


def _model_call(record: dict[str, Any], width: int) -> list[str]:
    usage = record.get("usage", {})
    head = (
        f"── step {record.get('step')} · {record.get('model', '')} · "
        f"{record.get('latency_s', 0):.1f}s · in {usage.get('input_tokens', 0)} "
        f"(cached {usage.get('cache_read_tokens', 0)}) out {usage.get('output_tokens', 0)} · "
        f"${usage.get('cost_usd', 0):.4f} (total ${record.get('total_cost_usd', 0):.4f}, "
        f"{record.get('total_tokens', 0)} tokens)"
    )
    lines = [head]
    if record.get("attempts", 1) > 1:
        lines.append(f"   (took {record['attempts']} attempts)")
    if record.get("text"):
        lines.extend(_indent(_clip(record["text"], width), "   assistant: "))
    return lines


def _tool_call(record: dict[str, Any], width: int) -> list[str]:
    arguments = record.get("arguments")
    shown = json.dumps(arguments) if isinstance(arguments, dict) else f"(raw) {arguments}"
    if record.get("is_error"):
        status = "✗ error"
    elif record.get("handle"):
        status = f"… still running as {record['handle']}"
    else:
        status = f"✓ exit {record['exit_code']}" if record.get("exit_code") is not None else "✓"
    duration = record.get("duration_s", 0)
    return [
        f"   → {record.get('name')} {_clip(shown, 300)}  [{status}, {duration:.2f}s]",
        *_indent(_clip(str(record.get("output", "")), width), "     │ "),
    ]


def _trimmed(record: dict[str, Any], width: int) -> list[str]:
    return [f"   (context: trimmed {record.get('outputs')} old tool outputs)"]


def _end(record: dict[str, Any], width: int) -> list[str]:
    lines = [
        f"═══ run ended: {record.get('reason')} after {record.get('steps')} steps, "
        f"{record.get('elapsed_s', 0):.1f}s, {record.get('total_tokens', 0)} tokens, "
        f"${record.get('total_cost_usd', 0):.4f}"
    ]
    if record.get("summary"):
        lines.extend(_indent(_clip(record["summary"], width), "summary: "))
    elif record.get("message"):
        lines.append(f"why: {record['message']}")
    return lines


def _unknown(record: dict[str, Any], width: int) -> list[str]:
    return [f"   ({record.get('type')}) {_clip(json.dumps(record), 300)}"]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else f"{text[:width]}… [{len(text) - width} more chars]"


def _indent(text: str, first: str = "   ") -> list[str]:
    rest = " " * len(first)
    return [(first if i == 0 else rest) + line for i, line in enumerate(text.splitlines())]


_RENDERERS: dict[str, Renderer] = {
    "run_start": _start,
    "model_call": _model_call,
    "tool_call": _tool_call,
    "context_trimmed": _trimmed,
    "run_end": _end,
}
