"""The agent: the LLM loop on the trusted side, and the model providers it talks to.

`model` holds the provider-neutral types and the `ModelProvider` seam; `providers` the
adapters (Anthropic Messages, OpenAI Chat Completions); `replay` a replay LLM server that
speaks both wire formats, for tests and offline runs.
"""

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

__all__ = [
    "AnthropicConfig",
    "AssistantMessage",
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
    "TokenUsage",
    "ToolCall",
    "ToolResult",
    "ToolSpec",
    "Usage",
    "UserMessage",
    "load_provider_config",
    "parse_provider_config",
]
