"""The agent: the LLM loop on the trusted side, and the model providers it talks to.

`model` holds the provider-neutral types and the `ModelProvider` seam; `providers` the
adapters (Anthropic Messages, OpenAI Chat Completions); `replay` a replay LLM server that
speaks both wire formats, for tests and offline runs. `loop` is the agent loop, `tools`
the `ToolExecutor` seam to the sandbox (`runner_executor` over a runner,
`fake_executor` for tests), `prompt` what the model is told, `trajectory` the JSONL
record of a run, `budget` and `exceptions` how a run ends.
"""

from forgehand.agent.budget import Budgets
from forgehand.agent.config import (
    AnthropicConfig,
    OpenAIConfig,
    Prices,
    ProviderConfig,
    RetrySettings,
    load_provider_config,
    parse_provider_config,
)
from forgehand.agent.errors import (
    ModelAuthError,
    ModelConfigError,
    ModelConnectionError,
    ModelError,
    ModelNotFoundError,
    ModelRateLimitError,
    ModelRequestError,
    ModelResponseError,
    ModelRetryableError,
    ModelServerError,
    ModelTimeoutError,
)
from forgehand.agent.exceptions import EndReason
from forgehand.agent.loop import Agent, AgentResult, AgentSettings
from forgehand.agent.model import (
    AssistantMessage,
    Message,
    ModelProvider,
    ModelResponse,
    StopReason,
    SystemMessage,
    TokenUsage,
    ToolCall,
    ToolResult,
    ToolSpec,
    Usage,
    UserMessage,
)
from forgehand.agent.prompt import IssueComment, Task, build_prompt
from forgehand.agent.tools import ToolExecutor, ToolOutcome
from forgehand.agent.trajectory import Trajectory, read_trajectory

__all__ = [
    "Agent",
    "AgentResult",
    "AgentSettings",
    "AnthropicConfig",
    "AssistantMessage",
    "Budgets",
    "EndReason",
    "IssueComment",
    "Message",
    "ModelAuthError",
    "ModelConfigError",
    "ModelConnectionError",
    "ModelError",
    "ModelNotFoundError",
    "ModelProvider",
    "ModelRateLimitError",
    "ModelRequestError",
    "ModelResponse",
    "ModelResponseError",
    "ModelRetryableError",
    "ModelServerError",
    "ModelTimeoutError",
    "OpenAIConfig",
    "Prices",
    "ProviderConfig",
    "RetrySettings",
    "StopReason",
    "SystemMessage",
    "Task",
    "TokenUsage",
    "ToolCall",
    "ToolExecutor",
    "ToolOutcome",
    "ToolResult",
    "ToolSpec",
    "Trajectory",
    "Usage",
    "UserMessage",
    "build_prompt",
    "load_provider_config",
    "parse_provider_config",
    "read_trajectory",
]
