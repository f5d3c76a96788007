"""Model provider adapters, one module each, and `build_provider` to pick one from config."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from forgehand.agent.config import AnthropicConfig, OpenAIConfig
from forgehand.agent.model import ModelProvider
from forgehand.agent.providers.anthropic import AnthropicProvider
from forgehand.agent.providers.openai import OpenAIProvider

_FACTORIES: dict[str, Callable[..., ModelProvider]] = {
    "anthropic": AnthropicProvider,
    "openai": OpenAIProvider,
}


def build_provider(
    config: AnthropicConfig | OpenAIConfig, *, environ: Mapping[str, str] | None = None
) -> ModelProvider:
    """The provider a validated configuration describes; the API key is resolved here."""
    return _FACTORIES[config.type](config, environ=environ)


__all__ = ["AnthropicProvider", "OpenAIProvider", "build_provider"]
