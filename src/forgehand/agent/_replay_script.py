"""The replay script: turns, each a loose matcher on the request and the answer to give.

```yaml
version: 1
turns:
  - match: {last_message_contains: "fix issue", tools_offered: [read_file]}
    reply:
      text: "Let me look."
      tool_calls: [{name: read_file, arguments: {path: README.md}}]
      usage: {input_tokens: 120, output_tokens: 30}
  - error: {status: 429, retry_after: "0.05"}
  - match: {last_tool_result_contains: "# forgehand"}
    reply: {text: "Done."}
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

_SNIPPET = 120


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class RequestView:
    """What a matcher can see of a request, in either wire format."""

    provider: Literal["anthropic", "openai"]
    model: str
    system: str
    last_role: str
    last_message: str
    last_tool_result: str | None
    last_is_tool_result: bool
    tools: tuple[str, ...]

    def summary(self) -> str:
        return (
            f"{self.provider} request for model {self.model!r}, last message from "
            f"{self.last_role}: {_clip(self.last_message)!r}, tools {list(self.tools)}"
        )


class Match(_Strict):
    """Conditions on the request; every one given must hold. Empty matches anything."""

    provider: Literal["anthropic", "openai"] | None = None
    model: str | None = None
    system_contains: str | None = None
    last_message_contains: str | None = None
    last_tool_result_contains: str | None = None
    tools_offered: list[str] | None = None

    def failures(self, view: RequestView) -> list[str]:
        """Why `view` does not match; empty when it does."""
        expected = [
            ("provider", self.provider, view.provider, True),
            ("model", self.model, view.model, True),
            ("system_contains", self.system_contains, view.system, False),
            ("last_message_contains", self.last_message_contains, view.last_message, False),
            (
                "last_tool_result_contains",
                self.last_tool_result_contains,
                view.last_tool_result or "",
                False,
            ),
        ]
        failures = [
            f"{name}: wanted {want!r}"
            for name, want, got, exact in expected
            if want is not None and not (want == got if exact else want in got)
        ]
        missing = [t for t in self.tools_offered or [] if t not in view.tools]
        if missing:
            failures.append(f"tools_offered: {missing} not offered")
        return failures

    def describe(self) -> str:
        given = self.model_dump(exclude_none=True)
        return json.dumps(given) if given else "any request"


class ScriptToolCall(_Strict):
    """A tool call to answer with. `arguments_raw` sends exactly that string (even bad JSON)."""

    name: str
    id: str | None = None
    arguments: dict[str, Any] = Field(default_factory=dict)
    arguments_raw: str | None = None

    def raw(self) -> str:
        return self.arguments_raw if self.arguments_raw is not None else json.dumps(self.arguments)


class ScriptUsage(_Strict):
    """Token counts to report; `input_tokens` is uncached input."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


class Reply(_Strict):
    """A successful answer: text, tool calls, or both."""

    text: str = ""
    tool_calls: list[ScriptToolCall] = Field(default_factory=list)
    stop_reason: str | None = Field(
        default=None, description="wire value; derived from tool_calls when omitted"
    )
    model: str | None = None
    usage: ScriptUsage = Field(default_factory=ScriptUsage)


class InjectedError(_Strict):
    """An HTTP error to answer with, in the provider's error shape."""

    status: int = Field(ge=400, le=599)
    message: str = ""
    retry_after: str | None = Field(default=None, description="seconds or an HTTP date")


class Turn(_Strict):
    """One expected request and the answer to it."""

    match: Match = Field(default_factory=Match)
    reply: Reply | None = None
    error: InjectedError | None = None
    delay_s: float = Field(default=0.0, ge=0, description="wait this long before answering")

    @model_validator(mode="after")
    def _one_answer(self) -> Turn:
        if (self.reply is None) == (self.error is None):
            raise ValueError("a turn needs exactly one of `reply` or `error`")
        return self


class Script(_Strict):
    """An ordered list of turns, served one per request."""

    version: Literal[1] = 1
    turns: list[Turn]

    @classmethod
    def load(cls, path: Path) -> Script:
        """Read a YAML or JSON script (YAML is a superset of JSON)."""
        return cls.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))

    def dump(self) -> str:
        """YAML text of the script."""
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
        data = {"version": self.version, **data}
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def anthropic_view(body: dict[str, Any]) -> RequestView:
    """Matcher view of a Messages API request body."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    last = messages[-1] if messages else {}
    results = [
        _text_of(block.get("content"))
        for message in messages
        for block in _blocks(message.get("content"))
        if block.get("type") == "tool_result"
    ]
    return RequestView(
        provider="anthropic",
        model=str(body.get("model", "")),
        system=_text_of(body.get("system")),
        last_role=str(last.get("role", "")),
        last_message=_anthropic_text(last.get("content")),
        last_tool_result=results[-1] if results else None,
        last_is_tool_result=any(
            b.get("type") == "tool_result" for b in _blocks(last.get("content"))
        ),
        tools=tuple(str(t.get("name", "")) for t in body.get("tools") or []),
    )


def openai_view(body: dict[str, Any]) -> RequestView:
    """Matcher view of a Chat Completions request body."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    last = messages[-1] if messages else {}
    results = [_text_of(m.get("content")) for m in messages if m.get("role") == "tool"]
    system = [_text_of(m.get("content")) for m in messages if m.get("role") in _SYSTEM_ROLES]
    return RequestView(
        provider="openai",
        model=str(body.get("model", "")),
        system="\n\n".join(system),
        last_role=str(last.get("role", "")),
        last_message=_text_of(last.get("content")),
        last_tool_result=results[-1] if results else None,
        last_is_tool_result=last.get("role") == "tool",
        tools=tuple(_openai_tool_name(t) for t in body.get("tools") or []),
    )


_SYSTEM_ROLES = ("system", "developer")


def _openai_tool_name(tool: dict[str, Any]) -> str:
    function = tool.get("function")
    return str(function.get("name", "") if isinstance(function, dict) else tool.get("name", ""))


def _anthropic_text(content: object) -> str:
    parts = []
    for block in _blocks(content):
        if block.get("type") == "tool_result":
            parts.append(_text_of(block.get("content")))
        elif block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "\n".join(parts)


def _blocks(content: object) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [b for b in content if isinstance(b, dict)]
    return []


def _text_of(content: object) -> str:
    """Text of a string or of a list of text parts/blocks."""
    return "\n".join(str(b.get("text", "")) for b in _blocks(content) if "text" in b)


def _clip(text: str) -> str:
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "…"
