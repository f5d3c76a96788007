"""A replay LLM server: both wire formats, answered from a script, on 127.0.0.1.

`ReplayServer` serves `POST /v1/messages` (Anthropic) and `POST /v1/chat/completions`
(OpenAI) from a `Script` of turns, one turn per request, in order. A request that does not
match the next turn's matcher gets HTTP 400 whose message names the turn expected and what
came instead; it is kept in `mismatches`. Every request received is kept in `requests`
(credentials removed from the headers), so tests can assert what the model was shown.

`RecordingProxy` forwards to a real upstream and writes a script of the session, with API
keys and Authorization headers scrubbed.

    async with ReplayServer(script) as server:
        config = AnthropicConfig(model="m", base_url=server.base_url, api_key=...)

    python -m forgehand.agent.replay --script FILE --port 0
    python -m forgehand.agent.replay --record https://api.anthropic.com --out FILE --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from forgehand.agent._http import HttpProtocolError, HttpRequest, HttpResponse, HttpServer, send
from forgehand.agent._replay_script import (
    InjectedError,
    Match,
    Reply,
    RequestView,
    Script,
    ScriptToolCall,
    ScriptUsage,
    Turn,
    anthropic_view,
    openai_view,
)
from forgehand.agent._replay_wire import (
    anthropic_error,
    anthropic_message,
    error_headers,
    openai_completion,
    openai_error,
    reply_from_anthropic,
    reply_from_openai,
)

__all__ = [
    "InjectedError",
    "Match",
    "Mismatch",
    "RecordedRequest",
    "RecordingProxy",
    "ReplayServer",
    "Reply",
    "Script",
    "ScriptToolCall",
    "ScriptUsage",
    "ServerState",
    "Turn",
    "main",
]

Wire = Literal["anthropic", "openai"]
_ROUTES: dict[str, Wire] = {
    "/v1/messages": "anthropic",
    "/v1/chat/completions": "openai",
    "/chat/completions": "openai",
}
_CREDENTIAL_HEADERS = ("x-api-key", "authorization", "api-key", "proxy-authorization")
_KEY_PATTERN = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6,})")
_REDACTED = "<redacted>"
_SNIPPET = 200
_JSON = {"content-type": "application/json"}


class ServerState(StrEnum):
    """Lifecycle of a replay server or proxy."""

    CREATED = "created"
    RUNNING = "running"
    CLOSED = "closed"


@dataclass(frozen=True)
class RecordedRequest:
    """A request as received, with credential headers replaced by `<redacted>`."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    text: str


@dataclass(frozen=True)
class Mismatch:
    """A request that did not match the turn the script expected."""

    turn: int | None
    expected: str
    received: str
    reasons: tuple[str, ...]

    def message(self) -> str:
        where = f"turn {self.turn}" if self.turn is not None else "no turn (script exhausted)"
        because = f" ({'; '.join(self.reasons)})" if self.reasons else ""
        return f"replay mismatch at {where}: expected {self.expected}; got {self.received}{because}"


class _Endpoint:
    """Shared lifecycle and request bookkeeping of the server and the proxy."""

    def __init__(self, *, port: int) -> None:
        self._http = HttpServer(self._handle, port=port)
        self.state = ServerState.CREATED
        self.requests: list[RecordedRequest] = []

    @property
    def base_url(self) -> str:
        """Root URL; give it to the Anthropic SDK as is."""
        return self._http.base_url

    @property
    def openai_base_url(self) -> str:
        """Root URL with `/v1`, as the OpenAI SDK expects."""
        return f"{self._http.base_url}/v1"

    async def start(self) -> None:
        await self._http.start()
        self.state = ServerState.RUNNING

    async def stop(self) -> None:
        await self._http.stop()
        self.state = ServerState.CLOSED

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _handle(self, request: HttpRequest) -> HttpResponse:
        wire = _ROUTES.get(request.path.split("?")[0])
        if request.method != "POST" or wire is None:
            return _json(404, {"error": {"message": f"no route {request.method} {request.path}"}})
        try:
            body = json.loads(request.body or b"{}")
        except json.JSONDecodeError:
            return _json(400, _error_body(wire, 400, "request body is not JSON"))
        if not isinstance(body, dict):
            return _json(400, _error_body(wire, 400, "request body is not a JSON object"))
        self.requests.append(_recorded(request, body))
        return await self._answer(wire, request, body)

    async def _answer(self, wire: Wire, request: HttpRequest, body: dict[str, Any]) -> HttpResponse:
        raise NotImplementedError


class ReplayServer(_Endpoint):
    """Answers requests from a script; `async with ReplayServer(script) as server: ...`."""

    def __init__(self, script: Script | Path, *, port: int = 0) -> None:
        super().__init__(port=port)
        self.script = script if isinstance(script, Script) else Script.load(script)
        self.position = 0
        self.mismatches: list[Mismatch] = []

    @property
    def remaining(self) -> int:
        """Turns not served yet."""
        return len(self.script.turns) - self.position

    async def _answer(self, wire: Wire, request: HttpRequest, body: dict[str, Any]) -> HttpResponse:
        view = anthropic_view(body) if wire == "anthropic" else openai_view(body)
        mismatch = self._check(view)
        if mismatch is not None:
            self.mismatches.append(mismatch)
            return _json(400, _error_body(wire, 400, mismatch.message()))
        turn = self.script.turns[self.position]
        self.position += 1
        if turn.delay_s:
            await asyncio.sleep(turn.delay_s)
        if turn.error is not None:
            return _injected(wire, turn.error)
        assert turn.reply is not None
        render = anthropic_message if wire == "anthropic" else openai_completion
        return _json(200, render(turn.reply, self.position, view.model))

    def _check(self, view: RequestView) -> Mismatch | None:
        if self.position >= len(self.script.turns):
            return Mismatch(
                None, f"nothing after {len(self.script.turns)} turns", view.summary(), ()
            )
        match = self.script.turns[self.position].match
        reasons = match.failures(view)
        if not reasons:
            return None
        return Mismatch(self.position + 1, match.describe(), view.summary(), tuple(reasons))


class RecordingProxy(_Endpoint):
    """Forwards to `upstream` and records a script; `script()` gives it, scrubbed."""

    def __init__(
        self,
        upstream: str,
        *,
        output: Path | None = None,
        port: int = 0,
        timeout_s: float = 600.0,
    ) -> None:
        super().__init__(port=port)
        self.upstream = upstream.rstrip("/")
        self.timeout_s = timeout_s
        self.output = output
        self._turns: list[Turn] = []
        self._secrets: set[str] = set()

    def script(self) -> Script:
        """The session so far as a script, with every credential seen removed."""
        script = Script(turns=list(self._turns))
        return Script.model_validate(_scrub(script.model_dump(), self._redact))

    async def stop(self) -> None:
        await super().stop()
        if self.output is not None:
            text = self.script().dump()
            await asyncio.to_thread(self.output.write_text, text, encoding="utf-8")

    async def _answer(self, wire: Wire, request: HttpRequest, body: dict[str, Any]) -> HttpResponse:
        self._secrets.update(_credentials(request.headers))
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await send(self.upstream + request.path, request)
        except (OSError, TimeoutError, HttpProtocolError, asyncio.IncompleteReadError) as exc:
            message = f"recording proxy cannot reach {self.upstream}: {exc!r}"
            return _json(502, _error_body(wire, 502, self._redact(message)))
        view = anthropic_view(body) if wire == "anthropic" else openai_view(body)
        self._turns.append(_turn(wire, view, answer))
        headers = {k: v for k, v in answer.headers.items() if k not in _HOP_HEADERS}
        return HttpResponse(status=answer.status, body=answer.body, headers=headers)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        return _KEY_PATTERN.sub(_REDACTED, text)


_HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


def _turn(wire: Wire, view: RequestView, answer: HttpResponse) -> Turn:
    match = _loose_match(view)
    if answer.status >= 400:
        return Turn(match=match, error=_recorded_error(answer))
    body = json.loads(answer.body)
    reply: Reply = reply_from_anthropic(body) if wire == "anthropic" else reply_from_openai(body)
    return Turn(match=match, reply=reply)


def _loose_match(view: RequestView) -> Match:
    if view.last_is_tool_result:
        snippet = (view.last_tool_result or "")[:_SNIPPET]
        return Match(provider=view.provider, last_tool_result_contains=snippet or None)
    snippet = view.last_message[:_SNIPPET]
    return Match(provider=view.provider, last_message_contains=snippet or None)


def _recorded_error(answer: HttpResponse) -> InjectedError:
    try:
        body = json.loads(answer.body)
        message = str(body.get("error", {}).get("message", ""))
    except (json.JSONDecodeError, AttributeError):
        message = answer.body.decode("utf-8", "replace")[:_SNIPPET]
    retry_after = answer.headers.get("retry-after")
    return InjectedError(status=answer.status, message=message, retry_after=retry_after)


def _credentials(headers: dict[str, str]) -> set[str]:
    found: set[str] = set()
    for name in _CREDENTIAL_HEADERS:
        value = headers.get(name, "")
        found.update(part for part in value.split() if len(part) >= 8)
    return found


def _scrub(value: Any, redact: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _scrub(v, redact) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, redact) for v in value]
    return value


def _recorded(request: HttpRequest, body: dict[str, Any]) -> RecordedRequest:
    headers = {
        k: (_REDACTED if k in _CREDENTIAL_HEADERS else v) for k, v in request.headers.items()
    }
    text = request.body.decode("utf-8", "replace")
    return RecordedRequest(request.method, request.path, headers, body, text)


def _injected(wire: Wire, error: InjectedError) -> HttpResponse:
    message = error.message or f"injected error {error.status}"
    body = _error_body(wire, error.status, message)
    return HttpResponse(error.status, json.dumps(body).encode(), error_headers(error))


def _error_body(wire: Wire, status: int, message: str) -> dict[str, Any]:
    return (
        anthropic_error(status, message) if wire == "anthropic" else openai_error(status, message)
    )


def _json(status: int, body: dict[str, Any]) -> HttpResponse:
    return HttpResponse(status, json.dumps(body).encode(), dict(_JSON))


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m forgehand.agent.replay",
        description="Replay LLM server speaking the Anthropic and OpenAI wire formats.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--script", type=Path, help="script of turns to serve (YAML or JSON)")
    mode.add_argument("--record", metavar="UPSTREAM", help="forward to UPSTREAM and record")
    parser.add_argument("--out", type=Path, help="where --record writes the script")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    args = parser.parse_args(argv)
    if args.record and args.out is None:
        parser.error("--record needs --out FILE")
    return args


async def _serve(args: argparse.Namespace) -> None:
    endpoint: _Endpoint
    if args.script is not None:
        endpoint = ReplayServer(args.script, port=args.port)
    else:
        endpoint = RecordingProxy(args.record, output=args.out, port=args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with endpoint:
        print(endpoint.base_url, flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints the base URL, serves until SIGINT or SIGTERM."""
    args = _parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
