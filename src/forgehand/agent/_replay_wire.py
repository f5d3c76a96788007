"""Script turns rendered in each provider's exact JSON shape, and recorded answers read back.

Shapes follow the public API references: Anthropic Messages (`type: message`, content
blocks, `stop_reason`, `usage` with cache counters; errors `{"type": "error", "error":
{...}}`) and OpenAI Chat Completions (`object: chat.completion`, `choices[].message.
tool_calls[].function.arguments` as a string, `finish_reason`, `usage` with
`prompt_tokens_details.cached_tokens`; errors `{"error": {message, type, param, code}}`).
"""

from __future__ import annotations

import json
from typing import Any

from forgehand.agent._replay_script import (
    InjectedError,
    Reply,
    ScriptToolCall,
    ScriptUsage,
)

_CREATED = 1_700_000_000
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_OPENAI_ERROR_CODES = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}


def anthropic_message(reply: Reply, seq: int, model: str) -> dict[str, Any]:
    """A Messages API response body."""
    content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}] if reply.text else []
    content.extend(_tool_use(call, seq, i) for i, call in enumerate(reply.tool_calls))
    stop = reply.stop_reason or ("tool_use" if reply.tool_calls else "end_turn")
    return {
        "id": f"msg_01replay{seq:012d}",
        "type": "message",
        "role": "assistant",
        "model": reply.model or model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": reply.usage.input_tokens,
            "cache_creation_input_tokens": reply.usage.cache_write_tokens,
            "cache_read_input_tokens": reply.usage.cache_read_tokens,
            "output_tokens": reply.usage.output_tokens,
            "service_tier": "standard",
        },
    }


def _tool_use(call: ScriptToolCall, seq: int, index: int) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": call.id or f"toolu_01replay{seq:08d}{index:04d}",
        "name": call.name,
        "input": _anthropic_input(call),
    }


def _anthropic_input(call: ScriptToolCall) -> object:
    # The real API always sends an object; a raw string is sent as-is to test robustness.
    if call.arguments_raw is None:
        return call.arguments
    try:
        value = json.loads(call.arguments_raw)
    except json.JSONDecodeError:
        return call.arguments_raw
    return value if isinstance(value, dict) else call.arguments_raw


def openai_completion(reply: Reply, seq: int, model: str) -> dict[str, Any]:
    """A Chat Completions response body."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": reply.text or None,
        "refusal": None,
        "annotations": [],
    }
    if reply.tool_calls:
        message["tool_calls"] = [_openai_call(c, seq, i) for i, c in enumerate(reply.tool_calls)]
    finish = reply.stop_reason or ("tool_calls" if reply.tool_calls else "stop")
    return {
        "id": f"chatcmpl-replay{seq:012d}",
        "object": "chat.completion",
        "created": _CREATED + seq,
        "model": reply.model or model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _openai_usage(reply.usage),
        "service_tier": "default",
        "system_fingerprint": None,
    }


def _openai_call(call: ScriptToolCall, seq: int, index: int) -> dict[str, Any]:
    return {
        "id": call.id or f"call_replay{seq:08d}{index:04d}",
        "type": "function",
        "function": {"name": call.name, "arguments": call.raw()},
    }


def _openai_usage(usage: ScriptUsage) -> dict[str, Any]:
    prompt = usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.output_tokens,
        "total_tokens": prompt + usage.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cache_read_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
            "audio_tokens": 0,
        },
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """A Messages API error body."""
    kind = _ANTHROPIC_ERROR_TYPES.get(
        status, "api_error" if status >= 500 else "invalid_request_error"
    )
    return {"type": "error", "error": {"type": kind, "message": message}}


def openai_error(status: int, message: str) -> dict[str, Any]:
    """A Chat Completions error body."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    code = _OPENAI_ERROR_CODES.get(status)
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_headers(error: InjectedError) -> dict[str, str]:
    """Response headers of an injected error."""
    headers = {"content-type": "application/json"}
    if error.retry_after is not None:
        headers["retry-after"] = error.retry_after
    return headers


def reply_from_anthropic(body: dict[str, Any]) -> Reply:
    """A script reply from a recorded Messages API response."""
    blocks = [b for b in body.get("content") or [] if isinstance(b, dict)]
    usage = body.get("usage") or {}
    return Reply(
        text="".join(str(b.get("text", "")) for b in blocks if b.get("type") == "text"),
        tool_calls=[_call_from_anthropic(b) for b in blocks if b.get("type") == "tool_use"],
        stop_reason=body.get("stop_reason"),
        model=body.get("model"),
        usage=ScriptUsage(
            input_tokens=int(usage.get("input_tokens") or 0),
            output_tokens=int(usage.get("output_tokens") or 0),
            cache_read_tokens=int(usage.get("cache_read_input_tokens") or 0),
            cache_write_tokens=int(usage.get("cache_creation_input_tokens") or 0),
        ),
    )


def _call_from_anthropic(block: dict[str, Any]) -> ScriptToolCall:
    value = block.get("input")
    name = str(block.get("name", ""))
    if isinstance(value, dict):
        return ScriptToolCall(name=name, id=block.get("id"), arguments=value)
    return ScriptToolCall(name=name, id=block.get("id"), arguments_raw=json.dumps(value))


def reply_from_openai(body: dict[str, Any]) -> Reply:
    """A script reply from a recorded Chat Completions response."""
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    usage = body.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    cached = int(details.get("cached_tokens") or 0)
    written = int(details.get("cache_write_tokens") or 0)
    return Reply(
        text=str(message.get("content") or ""),
        tool_calls=[_call_from_openai(c) for c in message.get("tool_calls") or []],
        stop_reason=choice.get("finish_reason"),
        model=body.get("model"),
        usage=ScriptUsage(
            input_tokens=max(0, int(usage.get("prompt_tokens") or 0) - cached - written),
            output_tokens=int(usage.get("completion_tokens") or 0),
            cache_read_tokens=cached,
            cache_write_tokens=written,
        ),
    )


def _call_from_openai(call: dict[str, Any]) -> ScriptToolCall:
    function = call.get("function") or {}
    raw = function.get("arguments")
    raw_text = raw if isinstance(raw, str) else json.dumps(raw)
    name = str(function.get("name", ""))
    try:
        parsed = json.loads(raw_text)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        return ScriptToolCall(name=name, id=call.get("id"), arguments=parsed)
    return ScriptToolCall(name=name, id=call.get("id"), arguments_raw=raw_text)
