"""Budgets of one agent run: steps, tokens, cost and wall time. Each ends the run when spent."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from forgehand.agent.exceptions import BudgetExceeded, EndReason
from forgehand.agent.model import Usage


class Budgets(BaseModel):
    """Limits of one run; None means unlimited. A step is one model call."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_steps: int | None = Field(default=50, gt=0, description="model calls")
    max_tokens: int | None = Field(default=None, gt=0, description="input + output tokens")
    max_cost_usd: float | None = Field(default=None, gt=0, description="USD at configured prices")
    max_seconds: float | None = Field(default=None, gt=0, description="wall time of the run")


def total_tokens(usage: Usage) -> int:
    """Every token counted against the budget: input (cached or not) and output."""
    return (
        usage.input_tokens
        + usage.cache_read_tokens
        + usage.cache_write_tokens
        + usage.output_tokens
    )


def check_budgets(budgets: Budgets, steps: int, usage: Usage) -> None:
    """Raise `BudgetExceeded` when another model call would go past a limit."""
    if budgets.max_steps is not None and steps >= budgets.max_steps:
        raise BudgetExceeded(
            EndReason.MAX_STEPS,
            f"step budget spent: {steps} model calls of {budgets.max_steps} allowed; "
            "raise --max-steps to let the agent go on",
        )
    tokens = total_tokens(usage)
    if budgets.max_tokens is not None and tokens >= budgets.max_tokens:
        raise BudgetExceeded(
            EndReason.MAX_TOKENS,
            f"token budget spent: {tokens} tokens of {budgets.max_tokens}; raise --max-tokens",
        )
    if budgets.max_cost_usd is not None and usage.cost_usd >= budgets.max_cost_usd:
        raise BudgetExceeded(
            EndReason.MAX_COST,
            f"cost budget spent: ${usage.cost_usd:.4f} of ${budgets.max_cost_usd:.4f}; "
            "raise --max-cost",
        )


def wall_time_exceeded(budgets: Budgets, elapsed: float) -> BudgetExceeded:
    """The exception for a spent wall-time budget."""
    return BudgetExceeded(
        EndReason.MAX_SECONDS,
        f"wall-time budget spent: {elapsed:.0f}s of {budgets.max_seconds:.0f}s; "
        "raise --max-seconds",
    )
