"""Control flow of the agent loop, by exceptions caught in one place (`Agent.run`).

    AgentStop                   ends the run; `Agent.run` turns it into an `AgentResult`
    ├── Finished                the model called `finish(summary)`
    ├── BudgetExceeded          steps, tokens, cost or wall time ran out
    ├── ModelFailed             the provider failed for good (after its retries)
    └── SandboxFault            the sandbox or its runner failed (not the command in it)

Everything the model does wrong (bad JSON, unknown tool, arguments that break the schema,
a command that fails) is *not* an exception here: it is answered to the model as an
error tool result, and the loop goes on.
"""

from __future__ import annotations

from enum import StrEnum


class EndReason(StrEnum):
    """Why a run ended; the CLI and the workflow report it."""

    FINISHED = "finished"
    MAX_STEPS = "max_steps"
    MAX_TOKENS = "max_tokens"
    MAX_COST = "max_cost"
    MAX_SECONDS = "max_seconds"
    MODEL_ERROR = "model_error"
    SANDBOX_FAULT = "sandbox_fault"


class AgentStop(Exception):
    """Base class: the run ends with `reason`; `message` says why in words."""

    reason: EndReason

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Finished(AgentStop):
    """The model said it is done; `message` is its summary."""

    reason = EndReason.FINISHED


class BudgetExceeded(AgentStop):
    """A budget ran out; `reason` names which one."""

    def __init__(self, reason: EndReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ModelFailed(AgentStop):
    """The model provider failed after its own retries (auth, quota, outage, bad request)."""

    reason = EndReason.MODEL_ERROR


class SandboxFault(AgentStop):
    """The runner or sandbox could not execute tools any more."""

    reason = EndReason.SANDBOX_FAULT


class ExecutorFault(Exception):
    """Raised by a `ToolExecutor` when the sandbox itself failed; the loop ends the run."""
