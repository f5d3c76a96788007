"""Configuration, key resolution, retry-after parsing and the wire conversions."""

from __future__ import annotations

import email.utils
import random
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletion

from forgehand.agent.config import (
    AnthropicConfig,
    OpenAIConfig,
    RetrySettings,
    load_provider_config,
    parse_provider_config,
    resolve_api_key,
)
from forgehand.agent.errors import ModelConfigError, ModelServerError
from forgehand.agent.model import AssistantMessage, Message, ToolCall, ToolResult, UserMessage
from forgehand.agent.providers import anthropic as anthropic_adapter
from forgehand.agent.providers import openai as openai_adapter
from forgehand.agent.providers._common import parse_arguments
from forgehand.agent.retry import RetryPolicy, parse_retry_after

from .conftest import API_KEY


def test_config_is_strict() -> None:
    with pytest.raises(ModelConfigError, match="extra_field"):
        parse_provider_config({"type": "anthropic", "model": "m", "extra_field": 1})
    with pytest.raises(ModelConfigError, match="timeout_s"):
        parse_provider_config({"type": "openai", "model": "m", "timeout_s": "10"})
    with pytest.raises(ModelConfigError):
        parse_provider_config({"type": "bedrock", "model": "m"})


def test_config_errors_do_not_echo_the_key() -> None:
    with pytest.raises(ModelConfigError) as caught:
        parse_provider_config({"type": "openai", "model": "m", "api_key": 12345678901})
    assert "12345678901" not in str(caught.value)


def test_key_is_hidden_in_repr() -> None:
    config = parse_provider_config({"type": "anthropic", "model": "m", "api_key": API_KEY})
    assert API_KEY not in repr(config)
    assert API_KEY not in str(config.model_dump())


def test_key_from_environment_or_config() -> None:
    config = AnthropicConfig(model="m")
    assert resolve_api_key(config, {"ANTHROPIC_API_KEY": "k1"}).get_secret_value() == "k1"  # type: ignore[union-attr]
    configured = parse_provider_config({"type": "openai", "model": "m", "api_key": "k2"})
    assert resolve_api_key(configured, {"OPENAI_API_KEY": "k1"}).get_secret_value() == "k2"  # type: ignore[union-attr]
    with pytest.raises(ModelConfigError, match="set ANTHROPIC_API_KEY"):
        resolve_api_key(config, {})
    assert resolve_api_key(OpenAIConfig(model="llama", require_api_key=False), {}) is None


def test_load_from_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(
        "type: openai\nmodel: qwen\nbase_url: http://127.0.0.1:11434/v1\n"
        "max_tokens_field: max_tokens\nprices: {input_per_mtok: 0.1}\n"
    )
    config = load_provider_config(path)
    assert isinstance(config, OpenAIConfig)
    assert config.prices.input_per_mtok == 0.1


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_800_000_000.0
    header = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after": header}, now=now) == pytest.approx(30)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after({"retry-after": past}, now=now) == 0


def test_backoff_grows_with_jitter_and_cap() -> None:
    settings = RetrySettings(initial_backoff_s=1, max_backoff_s=4, max_retry_after_s=10)
    policy = RetryPolicy(settings, rng=random.Random(1))
    plain = ModelServerError("x")
    delays = [policy.delay(n, plain) for n in range(1, 6)]
    assert 0.5 <= delays[0] <= 1
    assert 1 <= delays[1] <= 2
    assert all(d <= 4 for d in delays)
    assert policy.delay(1, ModelServerError("x", retry_after=99)) == 10


@pytest.mark.parametrize(
    ("raw", "ok"),
    [('{"a": 1}', True), ("", True), ('{"a": ', False), ("[1]", False), ("null", False)],
)
def test_parse_arguments(raw: str, ok: bool) -> None:
    arguments, error = parse_arguments(raw)
    assert (arguments is not None, error is None) == (ok, ok)


def test_anthropic_merges_tool_results_into_one_user_turn() -> None:
    calls = (
        ToolCall(id="a", name="t", arguments_raw="{}", arguments={}),
        ToolCall(id="b", name="t", arguments_raw="{", parse_error="bad"),
    )
    messages: list[Message] = [
        UserMessage(text="go"),
        AssistantMessage(tool_calls=calls),
        ToolResult(tool_call_id="a", content="1"),
        ToolResult(tool_call_id="b", content="2", is_error=True),
        UserMessage(text="and?"),
    ]
    wire = anthropic_adapter.to_wire_messages(messages, cache=False)
    assert [m["role"] for m in wire] == ["user", "assistant", "user"]
    assert [b["type"] for b in wire[2]["content"]] == ["tool_result", "tool_result", "text"]  # type: ignore[index,union-attr]
    assert wire[1]["content"][1]["input"] == {}  # type: ignore[index]


def test_openai_accepts_compatible_server_quirks() -> None:
    wire = ChatCompletion.model_validate(
        {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "llama",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "",
                                "type": "function",
                                "function": {"name": "run", "arguments": ""},
                            }
                        ],
                    },
                }
            ],
        }
    )
    call = openai_adapter.tool_call(wire.choices[0].message.tool_calls[0], 0)  # type: ignore[index]
    assert (call.id, call.arguments, call.parse_error) == ("call_0", {}, None)
    assert openai_adapter.to_usage(wire).model_dump()["input_tokens"] == 0
