"""``forgehand bench …``: benchmarks that print JSON (the README's numbers come from here).

- ``bench sandbox`` (``forgehand.bench.sandbox``): sandbox start, memory and density.
- ``bench runner`` (``forgehand.bench.runner``): exec latency, streaming and reconnects
  against host baselines; that module defines ``add_arguments(parser)`` and ``main(args)``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

NOT_AVAILABLE = 2


def register(commands: Any) -> None:
    bench = commands.add_parser("bench", help="run a benchmark and print JSON")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    register_sandbox_bench(sub)
    register_runner_bench(sub)
    register_solve_bench(sub)


def register_solve_bench(sub: Any) -> None:
    """``bench solve``: the demo's phases and repository seeding (``forgehand.bench.solve``)."""
    solve = sub.add_parser("solve", help="issue → draft MR: time per phase, seeding")
    solve.add_argument("--json", action="store_true", help="one line of JSON")
    solve.add_argument("--sandbox", default="auto", help="auto (bwrap), none, bwrap, gvisor…")
    solve.add_argument("--runs", type=int, default=3, help="demo runs (median reported)")
    solve.add_argument("--files", type=int, default=5000, help="files in the large repo")
    solve.add_argument("--commits", type=int, default=300, help="commits in the large repo")
    solve.add_argument("--seed-runs", type=int, default=5, help="seeding samples")
    solve.set_defaults(handler=_solve)


def _solve(args: argparse.Namespace) -> int:
    from forgehand.bench.solve import main

    return main(args)


def register_sandbox_bench(sub: Any) -> None:
    sandbox = sub.add_parser("sandbox", help="sandbox start time, idle memory and density")
    sandbox.add_argument("--json", action="store_true", help="one line of JSON (default: indented)")
    sandbox.add_argument("--runs", type=int, default=20, help="samples per measurement")
    sandbox.add_argument(
        "--density-max", type=int, default=100, help="stop the density test at this many"
    )
    sandbox.add_argument(
        "--backend",
        action="append",
        default=[],
        help="only this backend (repeatable; default: every available one)",
    )
    sandbox.set_defaults(handler=_sandbox)


def register_runner_bench(sub: Any) -> None:
    """``bench runner``: the runner's own benchmark, in ``forgehand.bench.runner``."""
    from forgehand.bench import runner as runner_bench

    runner = sub.add_parser("runner", help="runner exec latency, streaming, reconnects")
    runner_bench.add_arguments(runner)
    runner.set_defaults(handler=runner_bench.main)


def _sandbox(args: argparse.Namespace) -> int:
    from forgehand.bench.sandbox import BenchOptions, run_bench
    from forgehand.sandbox.errors import SandboxError

    if args.runs < 1 or args.density_max < 1:
        print("forgehand: --runs and --density-max must be at least 1", file=sys.stderr)
        return NOT_AVAILABLE
    options = BenchOptions(
        runs=args.runs, density_max=args.density_max, backends=tuple(args.backend)
    )
    try:
        result = asyncio.run(run_bench(options))
    except SandboxError as exc:
        print(f"forgehand: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0
