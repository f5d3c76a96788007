"""Configuration of model providers: one strict pydantic model per provider, `type` discriminated.

The API key comes from the operator's side only: the provider's environment variable
(ANTHROPIC_API_KEY, OPENAI_API_KEY) or `api_key` in forgehand's own configuration file.
Repository configuration (`.forgehand/`) never reaches these models. The key is a
`SecretStr`: it shows as `**********` in every repr, log line and error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError

from forgehand.agent.errors import ModelConfigError
from forgehand.agent.model import TokenUsage

_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)


class Prices(BaseModel):
    """USD per million tokens, by kind of token. Zero means free (a local model)."""

    model_config = _STRICT

    input_per_mtok: float = Field(default=0.0, ge=0)
    output_per_mtok: float = Field(default=0.0, ge=0)
    cache_read_per_mtok: float = Field(default=0.0, ge=0)
    cache_write_per_mtok: float = Field(default=0.0, ge=0)

    def cost(self, usage: TokenUsage) -> float:
        """What `usage` costs at these prices, in USD."""
        micro = (
            usage.input_tokens * self.input_per_mtok
            + usage.output_tokens * self.output_per_mtok
            + usage.cache_read_tokens * self.cache_read_per_mtok
            + usage.cache_write_tokens * self.cache_write_per_mtok
        )
        return micro / 1_000_000


class RetrySettings(BaseModel):
    """forgehand's single retry policy (the SDKs' own retries are turned off)."""

    model_config = _STRICT

    max_retries: int = Field(default=4, ge=0, description="retries after the first attempt")
    initial_backoff_s: float = Field(default=1.0, ge=0, description="first backoff, doubled after")
    max_backoff_s: float = Field(default=30.0, ge=0, description="cap on one computed backoff")
    max_retry_after_s: float = Field(
        default=60.0, ge=0, description="cap on a wait the provider asks for with retry-after"
    )


class _ProviderConfig(BaseModel):
    model_config = _STRICT

    api_key_env: ClassVar[str]

    model: str = Field(min_length=1, description="model name as the provider spells it")
    base_url: str = Field(description="API root; point it at a proxy or compatible server")
    api_key: SecretStr | None = Field(
        default=None, description="the key; omit to read the provider's environment variable"
    )
    timeout_s: float = Field(default=600.0, gt=0, description="read timeout of one attempt")
    connect_timeout_s: float = Field(default=10.0, gt=0)
    max_tokens: int = Field(default=8192, gt=0, description="output token limit per call")
    temperature: float | None = Field(default=None, ge=0)
    retry: RetrySettings = RetrySettings()
    prices: Prices = Prices()


class AnthropicConfig(_ProviderConfig):
    """Anthropic Messages API."""

    api_key_env: ClassVar[str] = "ANTHROPIC_API_KEY"

    type: Literal["anthropic"] = "anthropic"
    base_url: str = "https://api.anthropic.com"
    prompt_caching: bool = Field(
        default=True, description="mark system prompt, tools and conversation tail cacheable"
    )


class OpenAIConfig(_ProviderConfig):
    """OpenAI Chat Completions, or any server that speaks it (vLLM, Ollama, llama.cpp, ...)."""

    api_key_env: ClassVar[str] = "OPENAI_API_KEY"

    type: Literal["openai"] = "openai"
    base_url: str = "https://api.openai.com/v1"
    max_tokens_field: Literal["max_completion_tokens", "max_tokens"] = Field(
        default="max_completion_tokens",
        description="older compatible servers only understand max_tokens",
    )
    require_api_key: bool = Field(
        default=True, description="false for local servers that take no key (Ollama, llama.cpp)"
    )


ProviderConfig = Annotated[AnthropicConfig | OpenAIConfig, Field(discriminator="type")]
_ADAPTER: TypeAdapter[AnthropicConfig | OpenAIConfig] = TypeAdapter(ProviderConfig)


def parse_provider_config(data: Mapping[str, Any]) -> AnthropicConfig | OpenAIConfig:
    """Validate one provider section of forgehand's configuration."""
    try:
        return _ADAPTER.validate_python(dict(data))
    except ValidationError as exc:
        raise ModelConfigError(
            f"invalid model provider configuration: {_summarise(exc)}; "
            "fix the `model` section of forgehand's configuration file"
        ) from None


def load_provider_config(path: Path) -> AnthropicConfig | OpenAIConfig:
    """Read a provider section from a YAML or JSON file of the operator's configuration."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelConfigError(f"cannot read model configuration {path}: {exc.strerror}") from None
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: expected a mapping with a `type` key at the top")
    return parse_provider_config(data)


def resolve_api_key(
    config: AnthropicConfig | OpenAIConfig, environ: Mapping[str, str]
) -> SecretStr | None:
    """The key from the configuration file, else from the provider's environment variable."""
    if config.api_key is not None and config.api_key.get_secret_value():
        return config.api_key
    from_env = environ.get(config.api_key_env, "")
    if from_env:
        return SecretStr(from_env)
    if isinstance(config, OpenAIConfig) and not config.require_api_key:
        return None
    raise ModelConfigError(
        f"no API key for the {config.type} provider: set {config.api_key_env} in the "
        "service's environment or `api_key` in forgehand's configuration file"
    )


def _summarise(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in error["loc"]) or "(top)"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
