"""Anthropic Messages API adapter, through the official SDK's async client."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import anthropic
from anthropic.types import (
    CacheControlEphemeralParam,
    ContentBlockParam,
    MessageParam,
    TextBlockParam,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlockParam,
)
from anthropic.types import Message as WireMessage

from forgehand.agent.config import AnthropicConfig, resolve_api_key
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

_EPHEMERAL: CacheControlEphemeralParam = {"type": "ephemeral"}
_STOP_REASONS = {
    "end_turn": StopReason.END_TURN,
    "tool_use": StopReason.TOOL_USE,
    "max_tokens": StopReason.MAX_TOKENS,
    "model_context_window_exceeded": StopReason.MAX_TOKENS,
    "stop_sequence": StopReason.STOP_SEQUENCE,
    "refusal": StopReason.REFUSAL,
}


class AnthropicProvider:
    """`ModelProvider` for the Anthropic Messages API (or a server that speaks it)."""

    name = "anthropic"

    def __init__(self, config: AnthropicConfig, *, environ: Mapping[str, str] | None = None):
        key = resolve_api_key(config, os.environ if environ is None else environ)
        secret = key.get_secret_value() if key is not None else ""
        self.config = config
        self._retry = RetryPolicy(config.retry)
        self._errors = ErrorContext(
            provider=self.name,
            model=config.model,
            base_url=config.base_url,
            endpoint="/v1/messages",
            key_env=config.api_key_env,
            secrets=(secret,),
        )
        self._client = anthropic.AsyncAnthropic(
            api_key=secret,
            base_url=config.base_url,
            max_retries=0,
            timeout=anthropic.Timeout(config.timeout_s, connect=config.connect_timeout_s),
        )

    def __repr__(self) -> str:
        return f"AnthropicProvider(model={self.config.model!r}, base_url={self.config.base_url!r})"

    async def complete(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolSpec] = (),
        *,
        max_tokens: int | None = None,
    ) -> ModelResponse:
        """Send the conversation; see `ModelProvider.complete`."""
        started = time.monotonic()
        caching = self.config.prompt_caching
        system = to_wire_system(messages, cache=caching)
        wire_messages = to_wire_messages(messages, cache=caching)
        wire_tools = to_wire_tools(tools, cache=caching)
        limit = max_tokens or self.config.max_tokens

        async def attempt() -> WireMessage:
            return await self._create(system, wire_messages, wire_tools, limit)

        wire, attempts = await self._retry.run(attempt)
        return self._response(wire, attempts, time.monotonic() - started)

    async def aclose(self) -> None:
        """Close the SDK client's connections."""
        await self._client.close()

    async def _create(
        self,
        system: list[TextBlockParam],
        messages: list[MessageParam],
        tools: list[ToolParam],
        max_tokens: int,
    ) -> WireMessage:
        temperature = self.config.temperature
        extra = {"temperature": temperature} if temperature is not None else None
        try:
            return await self._client.messages.create(
                model=self.config.model,
                max_tokens=max_tokens,
                messages=messages,
                system=system if system else anthropic.omit,
                tools=tools if tools else anthropic.omit,
                extra_body=extra,
            )
        except anthropic.AnthropicError as exc:
            raise self._translate(exc) from None

    def _translate(self, exc: anthropic.AnthropicError) -> ModelError:
        if isinstance(exc, anthropic.APIStatusError):
            headers = dict(exc.response.headers.items())
            return status_error(self._errors, exc.status_code, exc.body, headers)
        if isinstance(exc, anthropic.APIConnectionError):
            timeout = isinstance(exc, anthropic.APITimeoutError)
            return connection_error(self._errors, exc.__cause__, timeout=timeout)
        return ModelResponseError(
            f"unreadable answer from anthropic at {self.config.base_url}: "
            f"{self._errors.redact(str(exc))}",
            provider=self.name,
        )

    def _response(self, wire: WireMessage, attempts: int, latency: float) -> ModelResponse:
        usage = to_usage(wire)
        usage = usage.model_copy(update={"cost_usd": self.config.prices.cost(usage)})
        calls = tuple(tool_call(block) for block in wire.content if block.type == "tool_use")
        text = "".join(block.text for block in wire.content if block.type == "text")
        raw_stop = wire.stop_reason or ""
        stop = _STOP_REASONS.get(raw_stop, StopReason.OTHER)
        return ModelResponse(
            text=text,
            tool_calls=calls,
            stop_reason=StopReason.TOOL_USE if calls else stop,
            raw_stop_reason=raw_stop,
            usage=usage,
            model=wire.model,
            provider=self.name,
            latency_s=latency,
            attempts=attempts,
        )


def tool_call(block: Any) -> ToolCall:
    """A neutral `ToolCall` from a `tool_use` block; a non-object input is a parse error."""
    value = block.input
    raw = value if isinstance(value, str) else json.dumps(value)
    arguments, error = parse_arguments(raw)
    return ToolCall(
        id=block.id, name=block.name, arguments_raw=raw, arguments=arguments, parse_error=error
    )


def to_usage(wire: WireMessage) -> TokenUsage:
    """Token counts of one answer (Anthropic reports uncached input separately already)."""
    usage = wire.usage
    return TokenUsage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_input_tokens or 0,
        cache_write_tokens=usage.cache_creation_input_tokens or 0,
    )


def to_wire_system(messages: Sequence[Message], *, cache: bool) -> list[TextBlockParam]:
    """All system messages as one system prompt, marked cacheable."""
    text = "\n\n".join(m.text for m in messages if isinstance(m, SystemMessage))
    if not text:
        return []
    block: TextBlockParam = {"type": "text", "text": text}
    if cache:
        block["cache_control"] = _EPHEMERAL
    return [block]


def to_wire_tools(tools: Sequence[ToolSpec], *, cache: bool) -> list[ToolParam]:
    """Tool specs; the last one carries the cache breakpoint that covers them all."""
    wire: list[ToolParam] = [
        {"name": t.name, "description": t.description, "input_schema": t.input_schema}
        for t in tools
    ]
    if cache and wire:
        wire[-1]["cache_control"] = _EPHEMERAL
    return wire


def to_wire_messages(messages: Sequence[Message], *, cache: bool) -> list[MessageParam]:
    """The conversation, merging consecutive same-role turns as the API expects."""
    turns: list[tuple[str, list[ContentBlockParam]]] = []
    for message in messages:
        role, blocks = _blocks(message)
        if not blocks:
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))
    if cache and turns:
        _mark_cacheable(turns[-1][1])
    return [_turn(role, blocks) for role, blocks in turns]


def _turn(role: str, blocks: list[ContentBlockParam]) -> MessageParam:
    if role == "assistant":
        return {"role": "assistant", "content": blocks}
    return {"role": "user", "content": blocks}


def _mark_cacheable(blocks: list[ContentBlockParam]) -> None:
    last = cast(dict[str, Any], blocks[-1])
    if last.get("type") in ("text", "tool_use", "tool_result"):
        last["cache_control"] = _EPHEMERAL


def _blocks(message: Message) -> tuple[str, list[ContentBlockParam]]:
    if isinstance(message, UserMessage):
        return "user", [_text(message.text)] if message.text else []
    if isinstance(message, AssistantMessage):
        return "assistant", _assistant_blocks(message)
    if isinstance(message, ToolResult):
        return "user", [_tool_result(message)]
    return "system", []


def _assistant_blocks(message: AssistantMessage) -> list[ContentBlockParam]:
    blocks: list[ContentBlockParam] = [_text(message.text)] if message.text else []
    blocks.extend(_tool_use(call) for call in message.tool_calls)
    return blocks


def _text(text: str) -> TextBlockParam:
    return {"type": "text", "text": text}


def _tool_use(call: ToolCall) -> ToolUseBlockParam:
    # A call whose arguments did not parse goes back as {}: the API accepts only objects.
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments or {}}


def _tool_result(result: ToolResult) -> ToolResultBlockParam:
    return {
        "type": "tool_result",
        "tool_use_id": result.tool_call_id,
        "content": result.content,
        "is_error": result.is_error,
    }
