"""``forgehand``: the command line. Each area registers its own subcommands from its own
module (``forgehand.cli.<area>``), so adding a command never touches shared code."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

# Modules that define `register(subparsers)`; each adds its commands with a `handler`.
COMMAND_MODULES: tuple[str, ...] = (
    "forgehand.cli.runner",
    "forgehand.cli.bench",
    "forgehand.cli.sandbox",
    "forgehand.cli.steps",
    "forgehand.cli.agent",
    "forgehand.cli.trajectory",
    "forgehand.cli.local",
    "forgehand.cli.solve",
    "forgehand.cli.demo",
)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forgehand", description="Turn an issue into a tested draft merge request."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that area has no commands yet
                continue
            raise
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from forgehand.runner.tuning import tune_malloc

    tune_malloc()
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
