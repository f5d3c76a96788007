"""What the run writes for people: branch name, commit message, MR description, issue comments."""

from __future__ import annotations

import re
from collections.abc import Sequence

from forgehand.workflow.evidence import SuiteReport
from forgehand.workflow.verify import Verification

BOT_NAME = "forgehand[bot]"
BOT_EMAIL = "forgehand-bot@users.noreply.localhost"
MAX_OUTPUT_CHARS = 3000


def slug(title: str, limit: int = 40) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return words[:limit].rstrip("-") or "issue"


def branch_name(issue_number: int, title: str) -> str:
    """`forgehand/<issue>-<slug>`: one branch per issue, reused by every re-run."""
    return f"forgehand/{issue_number}-{slug(title)}"


def co_author(requester: str) -> str:
    return f"Co-authored-by: {requester} <{requester}@users.noreply.localhost>"


def commit_message(issue_number: int, title: str, summary: str) -> str:
    body = summary.strip() or "Changes made by forgehand."
    return f"{title.strip()[:72]} (#{issue_number})\n\n{body}"


def mr_title(issue_number: int, title: str) -> str:
    return f"Fix #{issue_number}: {title.strip()}"[:200]


def _report_line(label: str, report: SuiteReport | None) -> str:
    if report is None:
        return f"| {label} | not run | |"
    state = "pass" if report.ok else "fail"
    return f"| {label} | {state} ({report.counts()}) | `{report.command}` |"


def evidence_table(verification: Verification) -> str:
    """Before/after test evidence as a Markdown table and list."""
    lines = [
        f"**Verdict:** {verification.verdict} — {verification.summary}",
        "",
        "| run | result | command |",
        "| --- | --- | --- |",
        _report_line("before the change", verification.before),
        _report_line("after the change", verification.after),
    ]
    if verification.new_tests:
        lines += ["", "New tests (run by the harness on the old code, then on the new):"]
        lines += [
            f"- `{t.test}`: {t.before} before → {t.after} after" for t in verification.new_tests
        ]
    if verification.regressions:
        lines += ["", "Regressions:", *(f"- `{t}`" for t in verification.regressions)]
    if verification.flags:
        lines += ["", "⚠️ Flagged for review:", *(f"- {f}" for f in verification.flags)]
    return "\n".join(lines)


def mr_description(
    *,
    issue_number: int,
    summary: str,
    diffstat: str,
    verification: Verification,
    cost: str,
    trajectory: str,
    run_id: str,
    sandbox: str = "",
) -> str:
    where = [f"- sandbox: {sandbox}"] if sandbox else []
    return "\n".join(
        [
            "Draft opened by forgehand. A person must review it; the bot never merges.",
            "",
            "## Summary",
            summary.strip() or "(the agent gave no summary)",
            "",
            "## What changed",
            f"```\n{diffstat.strip()}\n```",
            "",
            "## Test evidence (run by the harness, not the model)",
            evidence_table(verification),
            "",
            "## Run",
            f"- run: `{run_id}`",
            f"- cost: {cost}",
            f"- trajectory: `{trajectory}`",
            *where,
            "",
            f"Closes #{issue_number}",
        ]
    )


def report_marker(run_id: str) -> str:
    """An invisible tag in a run's report comment, so a resumed run finds its own report
    instead of posting a second one."""
    return f"<!-- forgehand report {run_id} -->"


def success_comment(mr_url: str, verification: Verification, cost: str, run_id: str) -> str:
    return (
        f"forgehand opened a draft merge request: {mr_url}\n\n"
        f"Outcome: done — {verification.summary}.\nCost: {cost}.\n\n{report_marker(run_id)}"
    )


def failure_comment(
    outcome: str, message: str, output: str, branch: str | None, run_id: str
) -> str:
    parts = [
        f"forgehand could not finish this issue (run `{run_id}`).",
        "",
        f"Reason: **{outcome}** — {message}",
    ]
    if output.strip():
        parts += ["", "Relevant output:", f"```\n{output.strip()[-MAX_OUTPUT_CHARS:]}\n```"]
    if branch:
        parts += ["", f"The partial work is on branch `{branch}`."]
    return "\n".join(parts)


def refusal_comment(reasons: Sequence[str]) -> str:
    return "forgehand will not work on this issue: " + "; ".join(reasons)
