"""Both providers through their real SDKs, over real HTTP, against the replay server."""

from __future__ import annotations

import logging
import time

import pytest

from forgehand.agent.errors import (
    ModelAuthError,
    ModelConnectionError,
    ModelNotFoundError,
    ModelRateLimitError,
    ModelRequestError,
    ModelServerError,
    ModelTimeoutError,
)
from forgehand.agent.model import (
    Message,
    StopReason,
    SystemMessage,
    ToolResult,
    ToolSpec,
    Usage,
    UserMessage,
)
from forgehand.agent.providers import build_provider
from forgehand.agent.replay import ReplayServer, Script

from .conftest import API_KEY, ProviderFactory, provider_config

READ_FILE = ToolSpec(
    name="read_file",
    description="Read a file of the repository.",
    input_schema={"type": "object", "properties": {"path": {"type": "string"}}},
)
RUN = ToolSpec(
    name="run",
    description="Run a command.",
    input_schema={"type": "object", "properties": {"cmd": {"type": "string"}}},
)
START: list[Message] = [
    SystemMessage(text="You fix issues."),
    UserMessage(text="Fix issue #1: typo in README"),
]
OK = {"reply": {"text": "ok"}}


def tool_turn(name: str = "read_file", **call: object) -> dict[str, object]:
    return {"reply": {"text": "Looking.", "tool_calls": [{"name": name, **call}]}}


async def test_multi_turn_tool_use(serve: ProviderFactory, kind: str) -> None:
    script = {
        "turns": [
            {
                "match": {"last_message_contains": "Fix issue #1", "tools_offered": ["read_file"]},
                **tool_turn(arguments={"path": "README.md"}),
            },
            {
                "match": {"last_tool_result_contains": "helo world"},
                "reply": {"text": "Fixed the typo.", "usage": {"output_tokens": 7}},
            },
        ]
    }
    async with serve(script) as (server, provider):
        first = await provider.complete(START, [READ_FILE, RUN])
        assert first.stop_reason is StopReason.TOOL_USE
        assert first.text == "Looking."
        (call,) = first.tool_calls
        assert (call.name, call.arguments, call.parse_error) == (
            "read_file",
            {"path": "README.md"},
            None,
        )

        conversation: list[Message] = [
            *START,
            first.to_message(),
            ToolResult(tool_call_id=call.id, content="# helo world"),
        ]
        second = await provider.complete(conversation, [READ_FILE, RUN])

    assert (second.text, second.stop_reason, second.tool_calls) == (
        "Fixed the typo.",
        StopReason.END_TURN,
        (),
    )
    assert second.usage.output_tokens == 7
    assert server.remaining == 0
    assert server.mismatches == []
    assert len(server.requests) == 2
    assert call.id in server.requests[1].text


async def test_anthropic_marks_system_tools_and_tail_cacheable() -> None:
    script = Script.model_validate({"turns": [OK]})
    async with ReplayServer(script) as server:
        provider = build_provider(provider_config("anthropic", server), environ={})
        await provider.complete(START, [READ_FILE, RUN])
        await provider.aclose()
    body = server.requests[0].body
    assert body["system"] == [
        {"type": "text", "text": "You fix issues.", "cache_control": {"type": "ephemeral"}}
    ]
    assert "cache_control" not in body["tools"][0]
    assert body["tools"][1]["cache_control"] == {"type": "ephemeral"}
    assert body["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}


async def test_anthropic_caching_can_be_turned_off() -> None:
    async with ReplayServer(Script.model_validate({"turns": [OK]})) as server:
        config = provider_config("anthropic", server, prompt_caching=False)
        provider = build_provider(config, environ={})
        await provider.complete(START, [READ_FILE])
        await provider.aclose()
    assert "cache_control" not in server.requests[0].text


async def test_429_waits_for_retry_after_then_succeeds(serve: ProviderFactory) -> None:
    script = {"turns": [{"error": {"status": 429, "retry_after": "0.3"}}, OK]}
    async with serve(script) as (server, provider):
        started = time.monotonic()
        response = await provider.complete(START)
        waited = time.monotonic() - started
    assert response.text == "ok"
    assert response.attempts == 2
    assert waited >= 0.3  # the backoff alone would be about 1 ms
    assert server.remaining == 0


async def test_retry_after_is_capped(serve: ProviderFactory) -> None:
    script = {"turns": [{"error": {"status": 429, "retry_after": "3600"}}, OK]}
    retry = {"max_retries": 1, "initial_backoff_s": 0.001, "max_retry_after_s": 0.05}
    async with serve(script, retry=retry) as (_, provider):
        started = time.monotonic()
        await provider.complete(START)
    assert time.monotonic() - started < 2


async def test_500_then_success(serve: ProviderFactory) -> None:
    script = {"turns": [{"error": {"status": 500, "message": "boom"}}, OK]}
    async with serve(script) as (_, provider):
        response = await provider.complete(START)
    assert (response.text, response.attempts) == ("ok", 2)


async def test_retries_run_out(serve: ProviderFactory) -> None:
    script = {"turns": [{"error": {"status": 503}}] * 3}
    retry = {"max_retries": 2, "initial_backoff_s": 0.001}
    async with serve(script, retry=retry) as (server, provider):
        with pytest.raises(ModelServerError) as caught:
            await provider.complete(START)
    assert caught.value.attempts == 3
    assert "gave up after 3 attempts" in str(caught.value)
    assert server.remaining == 0


async def test_rate_limit_error_after_retries(serve: ProviderFactory) -> None:
    script = {"turns": [{"error": {"status": 429, "retry_after": "0"}}]}
    async with serve(script, retry={"max_retries": 0}) as (_, provider):
        with pytest.raises(ModelRateLimitError, match="HTTP 429"):
            await provider.complete(START)


@pytest.mark.parametrize("status", [401, 403])
async def test_rejected_key_says_which_variable_to_set(
    serve: ProviderFactory, kind: str, status: int
) -> None:
    message = f"invalid x-api-key {API_KEY}"  # some providers echo the key back
    script = {"turns": [{"error": {"status": status, "message": message}}]}
    async with serve(script) as (server, provider):
        with pytest.raises(ModelAuthError) as caught:
            await provider.complete(START)
    text = str(caught.value)
    assert "the provider re" in text
    assert f"{kind.upper()}_API_KEY" in text
    assert API_KEY not in text
    assert API_KEY not in repr(caught.value)
    assert caught.value.__cause__ is None
    assert server.remaining == 0  # not retried


async def test_unknown_model(serve: ProviderFactory, kind: str) -> None:
    script = {"turns": [{"error": {"status": 404, "message": "model not found"}}]}
    async with serve(script) as (_, provider):
        with pytest.raises(ModelNotFoundError, match=f"unknown model '{kind}-test-model'"):
            await provider.complete(START)


async def test_other_4xx_is_a_request_error(serve: ProviderFactory) -> None:
    script = {"turns": [{"error": {"status": 400, "message": "prompt is too long"}}]}
    async with serve(script) as (_, provider):
        with pytest.raises(ModelRequestError, match="prompt is too long"):
            await provider.complete(START)


async def test_script_mismatch_names_the_expected_turn(serve: ProviderFactory) -> None:
    script = {"turns": [{"match": {"last_message_contains": "deploy"}, **OK}]}
    async with serve(script) as (server, provider):
        with pytest.raises(ModelRequestError, match="replay mismatch at turn 1") as caught:
            await provider.complete(START)
    assert "deploy" in str(caught.value)
    assert "Fix issue #1" in str(caught.value)
    assert len(server.mismatches) == 1
    assert server.remaining == 1


async def test_script_exhausted(serve: ProviderFactory) -> None:
    async with serve({"turns": [OK]}) as (server, provider):
        await provider.complete(START)
        with pytest.raises(ModelRequestError, match="script exhausted"):
            await provider.complete(START)
    assert server.mismatches[0].turn is None


async def test_malformed_arguments_are_a_parse_error(serve: ProviderFactory) -> None:
    script = {"turns": [tool_turn("run", arguments_raw='{"cmd": "pytest')]}
    async with serve(script) as (_, provider):
        response = await provider.complete(START, [RUN])
    (call,) = response.tool_calls
    assert call.name == "run"
    assert call.arguments is None
    assert call.parse_error is not None
    assert "not valid JSON" in call.parse_error or "JSON object" in call.parse_error
    assert response.stop_reason is StopReason.TOOL_USE


async def test_a_call_with_bad_arguments_can_be_sent_back(serve: ProviderFactory) -> None:
    script = {"turns": [tool_turn("run", arguments_raw="[1, 2"), OK]}
    async with serve(script) as (_, provider):
        first = await provider.complete(START, [RUN])
        (call,) = first.tool_calls
        error = ToolResult(tool_call_id=call.id, content=call.parse_error or "", is_error=True)
        second = await provider.complete([*START, first.to_message(), error], [RUN])
    assert second.text == "ok"


async def test_usage_and_cost(serve: ProviderFactory) -> None:
    usage = {
        "input_tokens": 1000,
        "output_tokens": 200,
        "cache_read_tokens": 5000,
        "cache_write_tokens": 300,
    }
    prices = {
        "input_per_mtok": 3.0,
        "output_per_mtok": 15.0,
        "cache_read_per_mtok": 0.3,
        "cache_write_per_mtok": 3.75,
    }
    script = {"turns": [{"reply": {"text": "a", "usage": usage}}] * 2}
    async with serve(script, prices=prices) as (_, provider):
        totals = Usage()
        for _ in range(2):
            response = await provider.complete(START)
            totals.add(response)
    expected = (1000 * 3.0 + 200 * 15.0 + 5000 * 0.3 + 300 * 3.75) / 1e6
    assert response.usage.model_dump() == {**usage, "cost_usd": pytest.approx(expected)}
    assert response.usage.total_input_tokens == 6300
    assert response.latency_s > 0
    assert totals.calls == 2
    assert totals.cost_usd == pytest.approx(2 * expected)
    assert (totals.input_tokens, totals.cache_read_tokens) == (2000, 10000)


async def test_key_stays_out_of_prompts_reprs_and_logs(
    serve: ProviderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    script = {"turns": [{"error": {"status": 500, "message": f"echo {API_KEY}"}}, OK]}
    async with serve(script) as (server, provider):
        await provider.complete(START)
        assert API_KEY not in repr(provider)
        assert API_KEY not in repr(provider.config)  # type: ignore[attr-defined]
    for request in server.requests:
        assert API_KEY not in request.text
        assert API_KEY not in str(request.headers)
    assert API_KEY not in caplog.text


async def test_timeout(serve: ProviderFactory) -> None:
    script = {"turns": [{"delay_s": 2, **OK}]}
    async with serve(script, timeout_s=0.2, retry={"max_retries": 0}) as (_, provider):
        with pytest.raises(ModelTimeoutError, match="did not answer in time"):
            await provider.complete(START)


async def test_unreachable_provider(kind: str) -> None:
    async with ReplayServer(Script(turns=[])) as server:
        config = provider_config(kind, server, retry={"max_retries": 1, "initial_backoff_s": 0})
    provider = build_provider(config, environ={})  # the server is gone: nothing listens
    with pytest.raises(ModelConnectionError, match="cannot reach") as caught:
        await provider.complete(START)
    await provider.aclose()
    assert caught.value.attempts == 2


async def test_tool_calls_under_finish_reason_stop_still_mean_tool_use(
    serve: ProviderFactory,
) -> None:
    script = {"turns": [{"reply": {"tool_calls": [{"name": "run"}], "stop_reason": "stop"}}]}
    async with serve(script) as (_, provider):
        response = await provider.complete(START, [RUN])
    assert response.stop_reason is StopReason.TOOL_USE
    assert response.tool_calls[0].arguments == {}
