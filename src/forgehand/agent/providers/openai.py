"""OpenAI Chat Completions adapter, through the official SDK's async client.

A configurable base URL makes it serve any compatible server: vLLM, Ollama, llama.cpp,
LiteLLM, OpenRouter. Those servers differ in small ways, handled here: tool calls under
finish_reason "stop", arguments as an object instead of a string, missing ids or usage.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import openai
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionAssistantMessageParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
)

from forgehand.agent.config import OpenAIConfig, resolve_api_key
from forgehand.agent.errors import ModelError, ModelResponseError
from forgehand.agent.model import (
    AssistantMessage,
    Message,
    ModelResponse,
    StopReason,
    SystemMessage,
    TokenUsage,
    ToolCall,
    ToolResult,
    ToolSpec,
    UserMessage,
)
from forgehand.agent.providers._common import (
    ErrorContext,
    connection_error,
    parse_arguments,
    status_error,
)
from forgehand.agent.retry import RetryPolicy

# Local servers that take no key still need a non-empty one for the SDK.
_NO_KEY = "no-key"
_STOP_REASONS = {
    "stop": StopReason.END_TURN,
    "tool_calls": StopReason.TOOL_USE,
    "function_call": StopReason.TOOL_USE,
    "length": StopReason.MAX_TOKENS,
    "content_filter": StopReason.REFUSAL,
}


class OpenAIProvider:
    """`ModelProvider` for OpenAI Chat Completions and compatible servers."""

    name = "openai"

    def __init__(self, config: OpenAIConfig, *, environ: Mapping[str, str] | None = None):
        key = resolve_api_key(config, os.environ if environ is None else environ)
        secret = key.get_secret_value() if key is not None else _NO_KEY
        self.config = config
        self._retry = RetryPolicy(config.retry)
        self._errors = ErrorContext(
            provider=self.name,
            model=config.model,
            base_url=config.base_url,
            endpoint="/chat/completions",
            key_env=config.api_key_env,
            secrets=(secret,) if key is not None else (),
        )
        self._client = openai.AsyncOpenAI(
            api_key=secret,
            base_url=config.base_url,
            max_retries=0,
            timeout=openai.Timeout(config.timeout_s, connect=config.connect_timeout_s),
        )

    def __repr__(self) -> str:
        return f"OpenAIProvider(model={self.config.model!r}, base_url={self.config.base_url!r})"

    async def complete(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolSpec] = (),
        *,
        max_tokens: int | None = None,
    ) -> ModelResponse:
        """Send the conversation; see `ModelProvider.complete`."""
        started = time.monotonic()
        wire_messages = to_wire_messages(messages)
        wire_tools = to_wire_tools(tools)
        limit = max_tokens or self.config.max_tokens

        async def attempt() -> ChatCompletion:
            return await self._create(wire_messages, wire_tools, limit)

        wire, attempts = await self._retry.run(attempt)
        return self._response(wire, attempts, time.monotonic() - started)

    async def aclose(self) -> None:
        """Close the SDK client's connections."""
        await self._client.close()

    async def _create(
        self,
        messages: list[ChatCompletionMessageParam],
        tools: list[ChatCompletionFunctionToolParam],
        max_tokens: int,
    ) -> ChatCompletion:
        body: dict[str, Any] = {self.config.max_tokens_field: max_tokens}
        if self.config.temperature is not None:
            body["temperature"] = self.config.temperature
        try:
            return await self._client.chat.completions.create(
                model=self.config.model,
                messages=messages,
                tools=tools if tools else openai.omit,
                extra_body=body,
            )
        except openai.OpenAIError as exc:
            raise self._translate(exc) from None

    def _translate(self, exc: openai.OpenAIError) -> ModelError:
        if isinstance(exc, openai.APIStatusError):
            headers = dict(exc.response.headers.items())
            return status_error(self._errors, exc.status_code, exc.body, headers)
        if isinstance(exc, openai.APIConnectionError):
            timeout = isinstance(exc, openai.APITimeoutError)
            return connection_error(self._errors, exc.__cause__, timeout=timeout)
        return ModelResponseError(
            f"unreadable answer from {self.config.base_url}: {self._errors.redact(str(exc))}",
            provider=self.name,
        )

    def _response(self, wire: ChatCompletion, attempts: int, latency: float) -> ModelResponse:
        if not wire.choices:
            raise ModelResponseError(
                f"{self.config.base_url} answered with no choices: check that it serves "
                f"model {self.config.model!r}",
                provider=self.name,
            )
        choice = wire.choices[0]
        usage = to_usage(wire)
        usage = usage.model_copy(update={"cost_usd": self.config.prices.cost(usage)})
        calls = tuple(
            tool_call(call, index) for index, call in enumerate(choice.message.tool_calls or [])
        )
        raw_stop = str(choice.finish_reason or "")
        stop = _STOP_REASONS.get(raw_stop, StopReason.OTHER)
        return ModelResponse(
            text=choice.message.content or "",
            tool_calls=calls,
            stop_reason=StopReason.TOOL_USE if calls else stop,
            raw_stop_reason=raw_stop,
            usage=usage,
            model=wire.model or self.config.model,
            provider=self.name,
            latency_s=latency,
            attempts=attempts,
        )


def tool_call(call: Any, index: int) -> ToolCall:
    """A neutral `ToolCall`; invalid JSON arguments become a parse error, never an exception."""
    function = getattr(call, "function", None)
    name = str(getattr(function, "name", "") or "")
    value = getattr(function, "arguments", "")
    raw = value if isinstance(value, str) else json.dumps(value)
    arguments, error = parse_arguments(raw)
    call_id = str(getattr(call, "id", "") or f"call_{index}")
    return ToolCall(
        id=call_id, name=name, arguments_raw=raw, arguments=arguments, parse_error=error
    )


def to_usage(wire: ChatCompletion) -> TokenUsage:
    """Token counts; OpenAI's prompt_tokens include the cached ones, which we split out."""
    usage = wire.usage
    if usage is None:
        return TokenUsage()
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details else 0
    written = (details.cache_write_tokens or 0) if details else 0
    return TokenUsage(
        input_tokens=max(0, usage.prompt_tokens - cached - written),
        output_tokens=usage.completion_tokens,
        cache_read_tokens=cached,
        cache_write_tokens=written,
    )


def to_wire_tools(tools: Sequence[ToolSpec]) -> list[ChatCompletionFunctionToolParam]:
    """Tool specs as function tools."""
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": t.input_schema,
            },
        }
        for t in tools
    ]


def to_wire_messages(messages: Sequence[Message]) -> list[ChatCompletionMessageParam]:
    """The conversation in Chat Completions form."""
    return [_wire_message(m) for m in messages]


def _wire_message(message: Message) -> ChatCompletionMessageParam:
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": message.text}
    if isinstance(message, UserMessage):
        return {"role": "user", "content": message.text}
    if isinstance(message, ToolResult):
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    return _assistant(message)


def _assistant(message: AssistantMessage) -> ChatCompletionAssistantMessageParam:
    wire: ChatCompletionAssistantMessageParam = {
        "role": "assistant",
        "content": message.text or None,
    }
    if message.tool_calls:
        wire["tool_calls"] = [_wire_call(call) for call in message.tool_calls]
    return wire


def _wire_call(call: ToolCall) -> ChatCompletionMessageFunctionToolCallParam:
    # Invalid arguments go back as {}: some servers re-parse them and would refuse the request.
    arguments = json.dumps(call.arguments) if call.arguments is not None else "{}"
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": arguments},
    }
