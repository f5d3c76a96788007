"""The run's vocabulary: phases, how a run ends, and the records the store keeps."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    """The phases of a run, in order. Each one's output is persisted when it completes."""

    GUARD = "guard"
    PROVISION = "provision"
    SETUP = "setup"
    BASELINE = "baseline"
    AGENT = "agent"
    EXTRACT = "extract"
    VERIFY = "verify"
    POLICY = "policy"
    PUBLISH = "publish"
    REPORT = "report"


PHASES: tuple[Phase, ...] = tuple(Phase)
SANDBOX_PHASES = frozenset({Phase.SETUP, Phase.BASELINE, Phase.AGENT, Phase.EXTRACT})


class Outcome(StrEnum):
    """Why a run ended; every run ends with exactly one."""

    DONE = "done"
    FAILED_TESTS = "failed_tests"
    NOTHING_VERIFIED = "nothing_verified"
    NO_CHANGES = "no_changes"
    BUDGET = "budget"
    MODEL_ERROR = "model_error"
    BLOCKED_NETWORK = "blocked_network"
    SANDBOX_FAULT = "sandbox_fault"
    SETUP_FAILED = "setup_failed"
    POLICY = "policy"
    FORGE_ERROR = "forge_error"
    REFUSED = "refused"
    CONFIG_ERROR = "config_error"
    INTERNAL = "internal"


class RunStatus(StrEnum):
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class RunRecord:
    """One run as the store has it."""

    run_id: str
    issue: str
    requester: str
    status: RunStatus
    phase: Phase | None
    outcome: Outcome | None
    message: str
    owner: str
    created: str
    updated: str
    outputs: dict[Phase, dict[str, Any]]

    @property
    def finished(self) -> bool:
        return self.status is RunStatus.FINISHED

    def next_phase(self) -> Phase | None:
        """The first phase without a persisted output; None when all are done."""
        return next((p for p in PHASES if p not in self.outputs), None)


class ClaimKind(StrEnum):
    NEW = "new"
    COLLAPSED = "collapsed"
    RESUMED = "resumed"


@dataclass(frozen=True)
class Claim:
    """What a trigger got: a new run, the live run it was collapsed into, or a run to resume."""

    kind: ClaimKind
    run: RunRecord


class RunEnded(Exception):
    """Ends a run early with an outcome; raised by phases, caught once in the engine."""

    def __init__(self, outcome: Outcome, message: str, **details: Any) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        self.details = details
