"""Fixtures for the model side: providers pointed at a replay server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from forgehand.agent.config import AnthropicConfig, OpenAIConfig, parse_provider_config
from forgehand.agent.model import ModelProvider
from forgehand.agent.providers import build_provider
from forgehand.agent.replay import ReplayServer, Script

API_KEY = "sk-test-Zx9SECRETkey0123456789abcdef"
FAST_RETRY = {"max_retries": 3, "initial_backoff_s": 0.001, "max_backoff_s": 0.01}


def provider_config(
    kind: str, server: ReplayServer, **overrides: Any
) -> AnthropicConfig | OpenAIConfig:
    base_url = server.base_url if kind == "anthropic" else server.openai_base_url
    data: dict[str, Any] = {
        "type": kind,
        "model": f"{kind}-test-model",
        "base_url": base_url,
        "api_key": API_KEY,
        "timeout_s": 5.0,
        "retry": FAST_RETRY,
    }
    data.update(overrides)
    return parse_provider_config(data)


ProviderFactory = Callable[..., Any]


@pytest.fixture(params=["anthropic", "openai"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def serve(kind: str) -> ProviderFactory:
    """`async with serve(script_dict, **config) as (server, provider): ...`."""

    @asynccontextmanager
    async def run(
        script: dict[str, Any], **overrides: Any
    ) -> AsyncIterator[tuple[ReplayServer, ModelProvider]]:
        async with ReplayServer(Script.model_validate(script)) as server:
            provider = build_provider(provider_config(kind, server, **overrides), environ={})
            try:
                yield server, provider
            finally:
                await provider.aclose()

    return run
