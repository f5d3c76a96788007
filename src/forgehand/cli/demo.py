"""``forgehand demo``: the issue → tested draft MR workflow end to end, on a bundled example.

A local forge is created in a fresh temporary directory (or ``--dir``) with a small Python
project that has a real bug and an issue about it; the whole workflow then runs, with
only the model's side replayed from a recording. Exit status 0 when the draft MR is open
with verified test evidence.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from forgehand.cli.solve import add_sandbox


def register(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="run the whole workflow on a bundled example (recorded model)"
    )
    demo.add_argument("--dir", type=Path, help="where to create the forge (default: a temp dir)")
    add_sandbox(demo)
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from forgehand.workflow.commands import demo_command

    return demo_command(args)
