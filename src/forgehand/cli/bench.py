"""``forgehand bench …``: benchmarks that print JSON (the README's numbers come from here).

- ``bench sandbox`` (``forgehand.bench.sandbox``): sandbox start, memory and density.
- ``bench runner``: registered by ``register_runner_bench``; its code lives in
  ``forgehand.bench.runner`` (owned by the runner's maintainers), imported only when the
  command runs. That module defines ``add_arguments(parser)`` and ``main(args) -> int``;
  its options are parsed from what follows ``bench runner``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from typing import Any

RUNNER_BENCH_MODULE = "forgehand.bench.runner"
NOT_AVAILABLE = 2


def register(commands: Any) -> None:
    bench = commands.add_parser("bench", help="run a benchmark and print JSON")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    register_sandbox_bench(sub)
    register_runner_bench(sub)


def register_sandbox_bench(sub: Any) -> None:
    sandbox = sub.add_parser("sandbox", help="sandbox start time, idle memory and density")
    sandbox.add_argument("--json", action="store_true", help="one line of JSON (default: indented)")
    sandbox.add_argument("--runs", type=int, default=20, help="samples per measurement")
    sandbox.add_argument(
        "--density-max", type=int, default=100, help="stop the density test at this many"
    )
    sandbox.set_defaults(handler=_sandbox)


def register_runner_bench(sub: Any) -> None:
    """``bench runner``: the runner's own benchmark, in ``forgehand.bench.runner``."""
    runner = sub.add_parser("runner", help="runner round trips (forgehand.bench.runner)")
    runner.add_argument("args", nargs=argparse.REMAINDER, help="passed to the runner benchmark")
    runner.set_defaults(handler=_runner)


def _runner(args: argparse.Namespace) -> int:
    try:
        module = importlib.import_module(RUNNER_BENCH_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != RUNNER_BENCH_MODULE:
            raise
        print(
            f"forgehand: `bench runner` is not available yet: {RUNNER_BENCH_MODULE} does not "
            "exist in this installation; update forgehand or run `forgehand bench sandbox`",
            file=sys.stderr,
        )
        return NOT_AVAILABLE
    parser = argparse.ArgumentParser(prog="forgehand bench runner")
    module.add_arguments(parser)
    code: int = module.main(parser.parse_args(args.args))
    return code


def _sandbox(args: argparse.Namespace) -> int:
    from forgehand.bench.sandbox import BenchOptions, run_bench
    from forgehand.sandbox.errors import SandboxError

    if args.runs < 1 or args.density_max < 1:
        print("forgehand: --runs and --density-max must be at least 1", file=sys.stderr)
        return NOT_AVAILABLE
    options = BenchOptions(runs=args.runs, density_max=args.density_max)
    try:
        result = asyncio.run(run_bench(options))
    except SandboxError as exc:
        print(f"forgehand: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0
