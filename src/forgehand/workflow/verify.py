"""Judging a change from the harness's test runs: before, after, and new tests on the old code.

- The whole suite must pass after the change.
- A test that passed before must still pass (else it is a regression).
- Tests the agent added must fail on the baseline tree (with only the agent's test files
  applied) and pass after: that is what shows they cover the fix.
- Deleted test files, tests that disappeared, new skips and lost assertions are flagged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from forgehand.workflow.evidence import SuiteReport

Verdict = Literal["verified", "failed", "nothing_verified"]
_SKIP = re.compile(
    r"pytest\.mark\.(skip|skipif|xfail)|pytest\.skip\(|unittest\.skip|\b(it|describe|test)\.skip\(|\bxit\("
)
_ASSERT = re.compile(r"\bassert|\bexpect\(|self\.assert")


def is_test_path(path: str) -> bool:
    """Whether a path looks like a test file (Python or JavaScript/TypeScript)."""
    name = path.rsplit("/", 1)[-1]
    parts = path.split("/")[:-1]
    if name.endswith(".py"):
        return name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py"
    if re.search(r"\.(test|spec)\.[cm]?[jt]sx?$", name):
        return True
    return any(p in ("tests", "test", "__tests__") for p in parts)


@dataclass(frozen=True)
class FileChange:
    """One path changed between the base and the result: A(dded), M(odified), D(eleted)."""

    status: str
    path: str


class NewTest(BaseModel):
    model_config = ConfigDict(frozen=True)

    test: str
    before: str
    after: str

    @property
    def proves_fix(self) -> bool:
        return self.after == "passed" and self.before in ("failed", "error")


class Verification(BaseModel):
    """The harness's verdict, with the evidence behind it."""

    model_config = ConfigDict(frozen=True)

    verdict: Verdict
    summary: str
    before: SuiteReport | None = None
    after: SuiteReport | None = None
    new_tests: list[NewTest] = Field(default_factory=list)
    regressions: list[str] = Field(default_factory=list)
    flags: list[str] = Field(default_factory=list)


def nothing_verified(reason: str) -> Verification:
    return Verification(verdict="nothing_verified", summary=reason)


def judge(
    before: SuiteReport,
    after: SuiteReport,
    on_base: SuiteReport | None,
    changes: Sequence[FileChange],
    test_diff: str,
) -> Verification:
    """The verdict on a change, from the three test runs and the diff of test files."""
    test_files = {c.path for c in changes if c.status != "D" and is_test_path(c.path)}
    new = _new_tests(before, after, on_base, test_files)
    regressions = sorted(
        t
        for t, o in before.results.items()
        if o == "passed" and after.results.get(t) in ("failed", "error")
    )
    flags = _flags(before, after, changes, test_diff, new, test_files)
    problems = _problems(after, regressions, new)
    verdict: Verdict = "failed" if problems else "verified"
    summary = "; ".join(problems) if problems else _success(after, new)
    return Verification(
        verdict=verdict,
        summary=summary,
        before=before,
        after=after,
        new_tests=new,
        regressions=regressions,
        flags=flags,
    )


def _new_tests(
    before: SuiteReport, after: SuiteReport, on_base: SuiteReport | None, files: set[str]
) -> list[NewTest]:
    found = []
    for test in sorted(after.results):
        if test in before.results or test.split("::", 1)[0] not in files:
            continue
        earlier = on_base.results.get(test, "not collected") if on_base else "not run"
        found.append(NewTest(test=test, before=earlier, after=after.results[test]))
    return found


def _problems(after: SuiteReport, regressions: list[str], new: list[NewTest]) -> list[str]:
    problems = []
    if not after.ok:
        failing = after.with_outcome("failed") + after.with_outcome("error")
        listed = f": {', '.join(failing[:10])}" if failing else f" ({after.counts()})"
        problems.append(f"the tests fail after the change{listed}")
    if regressions:
        problems.append(f"{len(regressions)} test(s) that passed before now fail")
    broken = [t.test for t in new if t.after != "passed"]
    if broken:
        problems.append(f"new test(s) do not pass: {', '.join(broken)}")
    return problems


def _success(after: SuiteReport, new: list[NewTest]) -> str:
    proving = sum(t.proves_fix for t in new)
    base = f"the test suite passes after the change ({after.counts()})"
    if proving:
        return f"{base}; {proving} new test(s) fail before the change and pass after"
    return base


def _flags(
    before: SuiteReport,
    after: SuiteReport,
    changes: Sequence[FileChange],
    test_diff: str,
    new: list[NewTest],
    test_files: set[str],
) -> list[str]:
    flags = [
        f"test file deleted: {c.path}" for c in changes if c.status == "D" and is_test_path(c.path)
    ]
    gone = sorted(set(before.results) - set(after.results))
    flags += [f"test no longer runs: {t}" for t in gone[:20]]
    flags += [
        f"new test passes without the fix (does not reproduce the issue): {t.test}"
        for t in new
        if t.after == "passed" and not t.proves_fix
    ]
    flags += _diff_flags(test_diff)
    if not test_files:
        flags.append("no test was added or changed to cover the change")
    if not after.results:
        flags.append("per-test results unavailable: judged by the exit code alone")
    return flags


def _diff_flags(diff: str) -> list[str]:
    added = [
        line[1:]
        for line in diff.splitlines()
        if line.startswith("+") and not line.startswith("+++")
    ]
    removed = [
        line[1:]
        for line in diff.splitlines()
        if line.startswith("-") and not line.startswith("---")
    ]
    flags = []
    if any(_SKIP.search(line) for line in added):
        flags.append("a test was marked skipped or expected to fail")
    lost = sum(bool(_ASSERT.search(x)) for x in removed) - sum(
        bool(_ASSERT.search(x)) for x in added
    )
    if lost > 0:
        flags.append(f"test files lost {lost} assertion line(s): check that no test was weakened")
    return flags
