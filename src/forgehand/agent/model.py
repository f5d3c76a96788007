"""Provider-neutral types of the model side of the agent, and the `ModelProvider` seam.

The agent loop speaks only these types; each provider adapter translates them to and from
its wire format. Messages are immutable pydantic models so a transcript can be persisted
and restored with `model_dump_json` / `model_validate_json`.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SystemMessage(_Frozen):
    """Instructions for the model; providers that take a separate system prompt get them there."""

    role: Literal["system"] = "system"
    text: str


class UserMessage(_Frozen):
    """Text from the user (or from the harness speaking for the user)."""

    role: Literal["user"] = "user"
    text: str


class ToolCall(_Frozen):
    """One tool call the model asked for.

    `arguments_raw` is exactly what the model produced. When it is not a JSON object,
    `arguments` is None and `parse_error` says why, so the agent can tell the model.
    """

    id: str
    name: str
    arguments_raw: str
    arguments: dict[str, Any] | None = None
    parse_error: str | None = None


class AssistantMessage(_Frozen):
    """What the model said: text, tool calls, or both."""

    role: Literal["assistant"] = "assistant"
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


class ToolResult(_Frozen):
    """The outcome of one tool call, sent back to the model."""

    role: Literal["tool"] = "tool"
    tool_call_id: str
    content: str
    is_error: bool = False


Message = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolResult, Field(discriminator="role")
]


class ToolSpec(_Frozen):
    """A tool offered to the model: its name, what it does, and a JSON Schema of its input."""

    name: str
    description: str
    input_schema: dict[str, Any]


class StopReason(StrEnum):
    """Why the model stopped, in provider-neutral terms."""

    END_TURN = "end_turn"
    TOOL_USE = "tool_use"
    MAX_TOKENS = "max_tokens"
    STOP_SEQUENCE = "stop_sequence"
    REFUSAL = "refusal"
    OTHER = "other"


class TokenUsage(_Frozen):
    """Tokens of one call and what they cost.

    `input_tokens` counts uncached input only; the total input is the sum of the three
    input counters, each billed at its own price.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def total_input_tokens(self) -> int:
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens


class ModelResponse(_Frozen):
    """One completed model call."""

    text: str
    tool_calls: tuple[ToolCall, ...]
    stop_reason: StopReason
    raw_stop_reason: str
    usage: TokenUsage
    model: str
    provider: str
    latency_s: float = Field(description="wall time of the call, retries included")
    attempts: int = 1

    def to_message(self) -> AssistantMessage:
        """The assistant message to append to the conversation."""
        return AssistantMessage(text=self.text, tool_calls=self.tool_calls)


class Usage:
    """Running totals over many calls (one agent run, say)."""

    def __init__(self) -> None:
        self.calls = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cache_read_tokens = 0
        self.cache_write_tokens = 0
        self.cost_usd = 0.0
        self.latency_s = 0.0

    def add(self, response: ModelResponse) -> None:
        """Count one response."""
        self.calls += 1
        self.input_tokens += response.usage.input_tokens
        self.output_tokens += response.usage.output_tokens
        self.cache_read_tokens += response.usage.cache_read_tokens
        self.cache_write_tokens += response.usage.cache_write_tokens
        self.cost_usd += response.usage.cost_usd
        self.latency_s += response.latency_s

    def __repr__(self) -> str:
        return (
            f"Usage(calls={self.calls}, input={self.input_tokens}, output={self.output_tokens}, "
            f"cache_read={self.cache_read_tokens}, cache_write={self.cache_write_tokens}, "
            f"cost_usd={self.cost_usd:.6f})"
        )


class ModelProvider(Protocol):
    """An LLM behind one wire format. Implementations live in `forgehand.agent.providers`."""

    name: str

    async def complete(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolSpec] = (),
        *,
        max_tokens: int | None = None,
    ) -> ModelResponse:
        """Send the conversation and return the model's next turn; raises `ModelError`."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
