"""Live progress of a run: the `Progress` seam, and the console printer the CLI uses."""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO

from forgehand.workflow.model import Phase


class Progress(Protocol):
    """Told about every phase and every agent step as they happen."""

    def phase(self, phase: Phase, state: str, detail: str = "") -> None: ...

    def note(self, text: str) -> None: ...

    def agent_event(self, event: dict[str, Any]) -> None: ...


class SilentProgress:
    """Progress that goes nowhere (tests, the service)."""

    def phase(self, phase: Phase, state: str, detail: str = "") -> None:
        return None

    def note(self, text: str) -> None:
        return None

    def agent_event(self, event: dict[str, Any]) -> None:
        return None


class ConsoleProgress:
    """One line per phase, tool call and model call, on stderr, with elapsed time."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.phase_started = self.started

    def _say(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[forgehand {elapsed:6.1f}s] {text}", file=self.stream, flush=True)

    def phase(self, phase: Phase, state: str, detail: str = "") -> None:
        if state == "start":
            self.phase_started = time.monotonic()
            self._say(f"── {phase.value}")
            return
        took = f" ({time.monotonic() - self.phase_started:.1f}s)" if state == "done" else ""
        self._say(f"   {phase.value} {state}{took}{': ' + detail if detail else ''}")

    def note(self, text: str) -> None:
        self._say(f"   {text}")

    def agent_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "model_call":
            calls = ", ".join(c["name"] for c in event.get("tool_calls", [])) or "no tool call"
            self._say(
                f"   model step {event['step']}: {calls} · {event['total_tokens']} tokens · "
                f"${event['total_cost_usd']:.4f}"
            )
        elif kind == "tool_call":
            self._say(f"     {event['name']} {_brief(event['arguments'])} → {_status(event)}")


def _status(event: dict[str, Any]) -> str:
    if event.get("handle"):
        return f"running as {event['handle']}"
    if event["is_error"]:
        return "error"
    code = event["exit_code"]
    return "ok" if code is None else f"exit {code}"


def _brief(value: Any, limit: int = 70) -> str:
    text = str(value).replace("\n", "⏎")
    return text if len(text) <= limit else text[: limit - 1] + "…"
