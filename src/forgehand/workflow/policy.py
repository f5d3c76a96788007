"""What may be published: protected paths, a secret scan of the diff, size limits.

Checked on the host, on the result commit in the mirror, before anything is pushed. Any
violation refuses the push; the report says which rule and where.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import cache

from pydantic import BaseModel, ConfigDict, Field

from forgehand.workflow.repo_config import SizeLimits
from forgehand.workflow.verify import FileChange

SECRET_PATTERNS: tuple[tuple[str, str], ...] = (
    ("private key", r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
    ("AWS access key id", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    ("GitHub token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})\b"),
    ("GitLab token", r"\bgl(?:pat|dt|rt|ptt|cbt)-[A-Za-z0-9_\-]{20,}\b"),
    ("Slack token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),
    ("Anthropic API key", r"\bsk-ant-[A-Za-z0-9_\-]{20,}\b"),
    ("OpenAI API key", r"\bsk-(?:proj-)?[A-Za-z0-9_\-]{32,}\b"),
    ("Google API key", r"\bAIza[0-9A-Za-z_\-]{35}\b"),
    ("Stripe key", r"\b[rs]k_live_[0-9a-zA-Z]{20,}\b"),
)


class Violation(BaseModel):
    model_config = ConfigDict(frozen=True)

    rule: str
    detail: str


class PolicyReport(BaseModel):
    """The policy check's findings; `allowed` is False when anything was found."""

    model_config = ConfigDict(frozen=True)

    violations: list[Violation] = Field(default_factory=list)

    @property
    def allowed(self) -> bool:
        return not self.violations

    def describe(self) -> str:
        return "\n".join(f"- {v.rule}: {v.detail}" for v in self.violations) or "- none"


@cache
def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def matches_glob(path: str, pattern: str) -> bool:
    """Glob match on a repository path: `*` stays within a directory, `**` crosses them."""
    return bool(_glob_regex(pattern.lstrip("/")).match(path))


def protected_hits(changes: Iterable[FileChange], patterns: Sequence[str]) -> list[Violation]:
    hits = []
    for change in changes:
        pattern = next((p for p in patterns if matches_glob(change.path, p)), None)
        if pattern is not None:
            hits.append(
                Violation(rule="protected path", detail=f"{change.path} (matches {pattern!r})")
            )
    return hits


def secret_hits(diff: str, known_secrets: Sequence[str] = ()) -> list[Violation]:
    """Secrets in the added lines of a unified diff (common token shapes and known values)."""
    hits: list[Violation] = []
    current = "?"
    for line in diff.splitlines():
        if line.startswith("+++ "):
            current = line.removeprefix("+++ ").removeprefix("b/")
            continue
        if not line.startswith("+"):
            continue
        hits += _line_secrets(current, line[1:], known_secrets)
    return hits


def _line_secrets(path: str, line: str, known: Sequence[str]) -> list[Violation]:
    found = [name for name, pattern in SECRET_PATTERNS if re.search(pattern, line)]
    if any(secret and len(secret) >= 8 and secret in line for secret in known):
        found.append("a credential of this service")
    return [Violation(rule="secret", detail=f"{name} in {path}") for name in found]


def size_hits(
    changes: Sequence[FileChange], diff_bytes: int, file_sizes: dict[str, int], limits: SizeLimits
) -> list[Violation]:
    hits = []
    if len(changes) > limits.max_changed_files:
        hits.append(
            Violation(
                rule="size",
                detail=f"{len(changes)} files changed, more than {limits.max_changed_files}",
            )
        )
    if diff_bytes > limits.max_diff_bytes:
        hits.append(
            Violation(rule="size", detail=f"diff of {diff_bytes} bytes > {limits.max_diff_bytes}")
        )
    for path, size in sorted(file_sizes.items()):
        if size > limits.max_file_bytes:
            hits.append(
                Violation(rule="size", detail=f"{path} is {size} bytes > {limits.max_file_bytes}")
            )
    return hits
