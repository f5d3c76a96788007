"""The harness's own test runs, and what they show per test.

The harness — not the model — runs the repository's test command through the runner.
Per-test outcomes are read from pytest's `-rA` summary lines (`PASSED path::test`); any
other command is judged by its exit code alone.
"""

from __future__ import annotations

import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from forgehand.runner.client import RunnerClient
from forgehand.runner.model import ExitReason, RunSpec

TestOutcome = Literal["passed", "failed", "error", "skipped", "xfailed", "xpassed"]
_SUMMARY = re.compile(r"^(PASSED|FAILED|ERROR|XFAIL|XPASS) (\S+?)(?: - .*)?$", re.MULTILINE)
_WORDS: dict[str, TestOutcome] = {
    "PASSED": "passed",
    "FAILED": "failed",
    "ERROR": "error",
    "XFAIL": "xfailed",
    "XPASS": "xpassed",
}
TAIL_CHARS = 4000


class SuiteReport(BaseModel):
    """One run of the test command."""

    model_config = ConfigDict(frozen=True)

    command: str
    exit_code: int
    reason: str = "exited"
    results: dict[str, TestOutcome] = Field(default_factory=dict)
    output_tail: str = ""
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.reason == "exited" and self.exit_code == 0

    def with_outcome(self, outcome: TestOutcome) -> list[str]:
        return sorted(t for t, o in self.results.items() if o == outcome)

    def counts(self) -> str:
        if not self.results:
            return f"exit code {self.exit_code}" if self.reason == "exited" else self.reason
        totals: dict[str, int] = {}
        for outcome in self.results.values():
            totals[outcome] = totals.get(outcome, 0) + 1
        return ", ".join(f"{n} {o}" for o, n in sorted(totals.items()))


def parse_results(output: str) -> dict[str, TestOutcome]:
    """Per-test outcomes from pytest `-rA` summary lines (empty for other runners)."""
    return {m.group(2): _WORDS[m.group(1)] for m in _SUMMARY.finditer(output)}


async def run_tests(
    client: RunnerClient,
    command: str,
    cwd: str,
    env: dict[str, str],
    timeout_s: float,
) -> SuiteReport:
    """Run `command` in `cwd` through the runner and report what it showed."""
    started = time.monotonic()
    spec = RunSpec(
        script=command,
        interpreter="bash",
        cwd=cwd,
        env=env,
        timeout_seconds=timeout_s,
        max_output_bytes=8 * 1024 * 1024,
    )
    result = await client.run(spec)
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    exited = result.exit
    return SuiteReport(
        command=command,
        exit_code=exited.code if exited.reason is ExitReason.EXITED else -1,
        reason=exited.reason.value,
        results=parse_results(output),
        output_tail=output[-TAIL_CHARS:],
        duration_s=round(time.monotonic() - started, 3),
    )
