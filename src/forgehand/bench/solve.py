"""``forgehand bench solve``: where the time of an issue → draft MR run goes.

1. The demo scenario end to end (local forge, recorded model), split by phase. The model's
   own time (the replay server's answers) is taken out of the agent phase, so the numbers
   are forgehand's overhead: sandboxes, seeding, harness test runs, extraction, publishing.
2. Seeding a large repository (generated here with `git fast-import`: many files, many
   commits): a warm mirror sync plus the local clone into a work dir, against a plain
   `git clone` of the same mirror over the git protocol (what a sandbox cloning from the
   forge would pay, minus the network).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from forgehand.agent.workspace import git
from forgehand.workflow.mirror import MirrorCache, seed_checkout
from forgehand.workflow.model import Phase


class PhaseClock:
    """`Progress` that times each phase and adds up the model's latency."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.model_s = 0.0
        self._started = 0.0

    def phase(self, phase: Phase, state: str, detail: str = "") -> None:
        if state == "start":
            self._started = time.monotonic()
        elif state == "done":
            self.phases[phase.value] = round(time.monotonic() - self._started, 4)

    def note(self, text: str) -> None:
        return None

    def agent_event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "model_call":
            self.model_s += float(event.get("latency_s") or 0.0)


def main(args: argparse.Namespace) -> int:
    from forgehand.workflow.app import SandboxChoiceError, choose_sandbox

    if min(args.runs, args.files, args.commits, args.seed_runs) < 1:
        print("forgehand bench solve: counts must be at least 1", file=sys.stderr)
        return 2
    try:
        sandbox = choose_sandbox(args.sandbox)
    except SandboxChoiceError as exc:
        print(f"forgehand bench solve: {exc}", file=sys.stderr)
        return 2
    result = asyncio.run(run_bench(args, sandbox))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


async def run_bench(args: argparse.Namespace, sandbox: str) -> dict[str, Any]:
    parent = "/tmp"  # short paths: the runner's sockets live under the scratch dirs
    with tempfile.TemporaryDirectory(prefix="fh-bench-", dir=parent) as scratch:
        root = Path(scratch)
        await asyncio.to_thread(root.chmod, 0o711)
        demo = [await _demo_once(root / f"demo-{n}", sandbox) for n in range(args.runs)]
        seeding = await _seeding(root / "large", args.files, args.commits, args.seed_runs)
    return {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "sandbox": sandbox,
        "demo": _median_demo(demo),
        "seeding": seeding,
    }


async def _demo_once(directory: Path, sandbox: str) -> dict[str, Any]:
    from forgehand.demo import run_demo

    clock = PhaseClock()
    started = time.monotonic()
    result = await run_demo(directory, sandbox, clock)
    total = time.monotonic() - started
    if result.record.outcome is None or result.record.outcome.value != "done":
        raise RuntimeError(f"the demo run ended {result.record.outcome}: {result.record.message}")
    phases = dict(clock.phases)
    phases["agent"] = round(phases.get("agent", 0.0) - clock.model_s, 4)
    return {"phases_s": phases, "total_s": total - clock.model_s, "model_s": clock.model_s}


def _median_demo(samples: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(samples[0]["phases_s"])
    return {
        "runs": len(samples),
        "phases_s_median": {
            n: round(statistics.median(s["phases_s"][n] for s in samples), 4) for n in names
        },
        "total_excluding_model_s_median": round(
            statistics.median(s["total_s"] for s in samples), 4
        ),
        "model_s_median": round(statistics.median(s["model_s"] for s in samples), 4),
        "note": "agent phase excludes the model's latency (recorded session)",
    }


async def _seeding(root: Path, files: int, commits: int, runs: int) -> dict[str, Any]:
    forge_repo = root / "forge.git"
    started = time.monotonic()
    await _generate(forge_repo, files, commits)
    generated = time.monotonic() - started
    mirrors = MirrorCache(root / "mirrors")
    cold = await _timed(lambda: mirrors.sync(str(forge_repo), None))
    mirror = await mirrors.sync(str(forge_repo), None)

    async def warm_seed() -> None:
        synced = await mirrors.sync(str(forge_repo), None)
        await seed_checkout(synced, _fresh(root), synced.head)

    async def plain_clone() -> None:
        await git("clone", "--quiet", f"file://{mirror.path}", str(_fresh(root)))

    async def seed_only() -> None:
        await seed_checkout(mirror, _fresh(root), mirror.head)

    async def sync_only() -> None:
        await mirrors.sync(str(forge_repo), None)

    await _timed(plain_clone)  # warm the page cache for both sides alike
    samples: dict[str, list[float]] = {"warm": [], "sync": [], "seed": [], "plain": []}
    for _ in range(runs):  # interleaved, so neither side gets the warmer cache
        for name, work in (
            ("plain", plain_clone),
            ("warm", warm_seed),
            ("sync", sync_only),
            ("seed", seed_only),
        ):
            samples[name].append(await _timed(work))
    warm, syncs, seeds, plain = (samples[k] for k in ("warm", "sync", "seed", "plain"))
    size = sum(p.stat().st_size for p in mirror.path.rglob("*") if p.is_file())
    return {
        "files": files,
        "commits": commits + 1,
        "mirror_bytes": size,
        "generate_s": round(generated, 3),
        "cold_mirror_s": round(cold, 4),
        "warm_mirror_sync_and_seed_s_median": round(statistics.median(warm), 4),
        "warm_mirror_sync_s_median": round(statistics.median(syncs), 4),
        "seed_from_mirror_s_median": round(statistics.median(seeds), 4),
        "plain_git_clone_s_median": round(statistics.median(plain), 4),
        "speedup": round(statistics.median(plain) / statistics.median(warm), 2),
    }


_counter = iter(range(1_000_000))


def _fresh(root: Path) -> Path:
    return root / f"checkout-{next(_counter)}"


async def _timed(work: Callable[[], Awaitable[Any]]) -> float:
    started = time.monotonic()
    await work()
    return time.monotonic() - started


async def _generate(bare: Path, files: int, commits: int) -> None:
    """A bare repository with `files` files and `commits` later commits, via fast-import."""
    await git("init", "--quiet", "--bare", "--initial-branch=main", str(bare))
    stream = await asyncio.to_thread(_fast_import_stream, files, commits)
    process = await asyncio.create_subprocess_exec(
        "git",
        "--git-dir",
        str(bare),
        "fast-import",
        "--quiet",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    await process.communicate(stream)
    if process.returncode != 0:
        raise RuntimeError("git fast-import failed while generating the large repository")


def _blob(text: str) -> bytes:
    data = text.encode()
    return b"data %d\n%s\n" % (len(data), data)


def _fast_import_stream(files: int, commits: int) -> bytes:
    out = bytearray()
    when = 1_700_000_000
    for number in range(commits + 1):
        out += b"commit refs/heads/main\n"
        out += b"committer Bench <bench@example.invalid> %d +0000\n" % (when + number)
        out += _blob(f"commit {number}")
        touched = range(files) if number == 0 else range(number % 50, files, max(1, files // 25))
        for index in touched:
            body = "\n".join(
                f"line {line} of {index}, v{number}: {(index * 7919 + line * number) % 104729:x}"
                for line in range(40)
            )
            out += b"M 644 inline src/pkg%d/module_%d.py\n" % (index % 100, index)
            out += _blob(body)
        out += b"\n"
    return bytes(out)
