"""The agent loop: ask the model, run the tools it calls, repeat until it finishes or a
budget runs out.

    result = await Agent(provider, executor, budgets=Budgets(max_steps=30)).run(system, task)

Each step is one model call followed by its tool calls. Malformed calls (bad JSON, unknown
tool, arguments against the schema) are answered with an error the model can act on.
Commands still running after the yield time hand back a handle, and `wait`,
`send_input` and `cancel` are offered while any is pending. The run ends by an
`AgentStop` exception (see `exceptions`), caught in one place: `run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
from pydantic import BaseModel, ConfigDict, Field

from forgehand.agent.budget import Budgets, check_budgets, total_tokens, wall_time_exceeded
from forgehand.agent.context import OutputStore, clip, estimate_tokens, trim_tool_outputs
from forgehand.agent.errors import ModelError
from forgehand.agent.exceptions import (
    AgentStop,
    EndReason,
    ExecutorFault,
    Finished,
    ModelFailed,
    SandboxFault,
)
from forgehand.agent.model import (
    Message,
    ModelProvider,
    ModelResponse,
    StopReason,
    SystemMessage,
    ToolCall,
    ToolResult,
    ToolSpec,
    Usage,
    UserMessage,
)
from forgehand.agent.tools import ToolExecutor, ToolOutcome
from forgehand.agent.trajectory import Trajectory
from forgehand.steps.masking import Masker

_HANDLE = {"type": "string", "description": "the handle a still-running command returned"}
FINISH = ToolSpec(
    name="finish",
    description="End the task: say what you changed and how you tested it (or why not).",
    input_schema={
        "type": "object",
        "properties": {"summary": {"type": "string"}},
        "required": ["summary"],
        "additionalProperties": False,
    },
)
PAGE_OUTPUT = ToolSpec(
    name="page_output",
    description="Read more of a clipped tool output, from a character offset.",
    input_schema={
        "type": "object",
        "properties": {
            "handle": {"type": "string", "description": "e.g. out-1, from the clipped output"},
            "offset": {"type": "integer", "minimum": 0},
        },
        "required": ["handle", "offset"],
        "additionalProperties": False,
    },
)
WAIT = ToolSpec(
    name="wait",
    description="Keep watching a still-running command; returns its new output.",
    input_schema={
        "type": "object",
        "properties": {"handle": _HANDLE, "seconds": {"type": "number", "exclusiveMinimum": 0}},
        "required": ["handle"],
        "additionalProperties": False,
    },
)
SEND_INPUT = ToolSpec(
    name="send_input",
    description="Type text into a still-running command's stdin (add \\n for Enter).",
    input_schema={
        "type": "object",
        "properties": {"handle": _HANDLE, "text": {"type": "string"}, "eof": {"type": "boolean"}},
        "required": ["handle", "text"],
        "additionalProperties": False,
    },
)
CANCEL = ToolSpec(
    name="cancel",
    description="Stop a still-running command.",
    input_schema={
        "type": "object",
        "properties": {"handle": _HANDLE},
        "required": ["handle"],
        "additionalProperties": False,
    },
)
CONTROL_TOOLS = frozenset({"finish", "page_output", "wait", "send_input", "cancel"})
NUDGE = (
    "You answered without calling a tool. Keep working with the tools, or call finish "
    "with a summary when the task is done."
)


class AgentSettings(BaseModel):
    """How the loop treats outputs, long commands and the context window."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    yield_after_s: float = Field(default=20.0, gt=0, description="hand back a command after")
    max_wait_s: float = Field(default=300.0, gt=0, description="longest single `wait`")
    input_echo_s: float = Field(default=2.0, gt=0, description="watch after send_input")
    max_output_chars: int = Field(default=16_000, ge=1000, description="clip outputs past this")
    page_chars: int = Field(default=16_000, ge=1000, description="characters per page_output")
    context_tokens: int = Field(default=150_000, ge=4000, description="trim old outputs past")
    max_response_tokens: int | None = Field(default=None, gt=0)


@dataclass(frozen=True)
class AgentResult:
    """How a run ended, and what it cost. `finished` is False for every budget or fault."""

    reason: EndReason
    message: str
    summary: str
    steps: int
    usage: Usage
    elapsed_s: float

    @property
    def finished(self) -> bool:
        return self.reason is EndReason.FINISHED


class Agent:
    """One agent run over a model provider and a tool executor."""

    def __init__(
        self,
        provider: ModelProvider,
        executor: ToolExecutor,
        *,
        budgets: Budgets | None = None,
        settings: AgentSettings | None = None,
        trajectory: Trajectory | None = None,
        secrets: Sequence[str] = (),
    ) -> None:
        self.provider = provider
        self.executor = executor
        self.budgets = budgets or Budgets()
        self.settings = settings or AgentSettings()
        self.masker = Masker(secrets)
        self.trajectory = trajectory or Trajectory(None, self.masker)
        self.messages: list[Message] = []
        self.usage = Usage()
        self.steps = 0
        self.outputs = OutputStore()
        self.pending: set[str] = set()
        self._logged = 0
        self._started = 0.0
        self._summary: str | None = None
        self._validators: dict[str, Any] = {}

    async def run(self, system: SystemMessage, task: UserMessage) -> AgentResult:
        """Run until the model finishes or a budget or fault ends the run."""
        self._started = time.monotonic()
        self.messages = [system, task]
        await self.trajectory.open()
        await self._record_start(system, task)
        try:
            while True:
                await self._step()
        except AgentStop as stop:
            result = self._result(stop)
        finally:
            await self._cancel_pending()
        await self.trajectory.record("run_end", **self._end_fields(result))
        await self.trajectory.close()
        return result

    async def _step(self) -> None:
        check_budgets(self.budgets, self.steps, self.usage)
        async with self._wall_clock():
            response = await self._query()
            results = [await self._tool_call(call) for call in response.tool_calls]
            self.messages.extend(results)
        if self._summary is not None:
            raise Finished(self._summary)
        if not response.tool_calls:
            self.messages.append(UserMessage(text=NUDGE))

    # -- the model ----------------------------------------------------------------------

    async def _query(self) -> ModelResponse:
        await self._trim_context()
        tools = self._offered_tools()
        try:
            response = await self.provider.complete(
                self.messages, tools, max_tokens=self.settings.max_response_tokens
            )
        except ModelError as exc:
            raise ModelFailed(f"the model provider failed: {exc}") from None
        self.steps += 1
        self.usage.add(response)
        await self._record_model_call(response)
        self.messages.append(response.to_message())
        return response

    def _offered_tools(self) -> list[ToolSpec]:
        own = [t for t in self.executor.tools() if t.name not in CONTROL_TOOLS]
        control = [FINISH, PAGE_OUTPUT, *((WAIT, SEND_INPUT, CANCEL) if self.pending else ())]
        return own + control

    async def _trim_context(self) -> None:
        limit = self.settings.context_tokens
        if estimate_tokens(self.messages) <= limit:
            return
        trimmed = trim_tool_outputs(self.messages, int(limit * 0.6))
        await self.trajectory.record("context_trimmed", step=self.steps, outputs=trimmed)

    # -- tools --------------------------------------------------------------------------

    async def _tool_call(self, call: ToolCall) -> ToolResult:
        started = time.monotonic()
        problem = self._problem(call)
        outcome = ToolOutcome(problem, is_error=True) if problem else await self._dispatch(call)
        text = clip(self.masker.mask_text(outcome.text) or "[no output]",
                    self.settings.max_output_chars, self.outputs)  # fmt: skip
        await self.trajectory.record(
            "tool_call",
            step=self.steps,
            id=call.id,
            name=call.name,
            arguments=call.arguments if call.arguments is not None else call.arguments_raw,
            output=text,
            output_chars=len(outcome.text),
            is_error=outcome.is_error,
            exit_code=outcome.exit_code,
            handle=outcome.handle,
            duration_s=round(time.monotonic() - started, 3),
        )
        return ToolResult(tool_call_id=call.id, content=text, is_error=outcome.is_error)

    def _problem(self, call: ToolCall) -> str | None:
        """Why the call cannot run, in words the model can act on; None when it can."""
        if call.parse_error is not None or call.arguments is None:
            return f"the call to {call.name} did not run: {call.parse_error or 'no arguments'}"
        tools = {t.name: t for t in self._offered_tools()}
        if call.name not in tools:
            names = ", ".join(tools)
            return f"there is no tool {call.name!r} (now); call one of: {names}"
        errors = sorted(self._validator(tools[call.name]).iter_errors(call.arguments), key=str)
        if not errors:
            return None
        reasons = "; ".join(f"{_where(e.absolute_path)}: {e.message}" for e in errors[:5])
        return f"the call to {call.name} did not run: its arguments break the schema: {reasons}"

    def _validator(self, tool: ToolSpec) -> Any:
        if tool.name not in self._validators:
            cls = jsonschema.validators.validator_for(
                tool.input_schema, default=jsonschema.Draft202012Validator
            )
            self._validators[tool.name] = cls(tool.input_schema)
        return self._validators[tool.name]

    async def _dispatch(self, call: ToolCall) -> ToolOutcome:
        args = call.arguments or {}
        try:
            outcome = await self._control(call.name, args)
            if outcome is None:
                outcome = await self.executor.call(
                    call.name, args, yield_after=self.settings.yield_after_s
                )
        except ExecutorFault as exc:
            raise SandboxFault(str(exc)) from None
        if outcome.handle is not None:
            self.pending.add(outcome.handle)
        elif call.name in ("wait", "send_input", "cancel"):
            self.pending.discard(str(args.get("handle")))
        return outcome

    async def _control(self, name: str, args: dict[str, Any]) -> ToolOutcome | None:
        """The loop's own tools; None for the executor's."""
        if name == "finish":
            self._summary = str(args["summary"])
            return ToolOutcome("finishing")
        if name == "page_output":
            text, error = self.outputs.page(
                args["handle"], args["offset"], self.settings.page_chars
            )
            return ToolOutcome(text, is_error=error)
        if name not in ("wait", "send_input", "cancel"):
            return None
        handle = str(args["handle"])
        if handle not in self.pending:
            running = ", ".join(sorted(self.pending)) or "none"
            return ToolOutcome(f"no running command {handle!r} (running: {running})", is_error=True)
        if name == "cancel":
            return await self.executor.cancel(handle)
        if name == "send_input":
            await self.executor.send_input(handle, str(args["text"]), eof=bool(args.get("eof")))
            return await self.executor.wait(handle, self.settings.input_echo_s)
        seconds = float(args.get("seconds") or self.settings.yield_after_s)
        return await self.executor.wait(handle, min(seconds, self.settings.max_wait_s))

    async def _cancel_pending(self) -> None:
        for handle in sorted(self.pending):
            with contextlib.suppress(ExecutorFault):
                await self.executor.cancel(handle)
        self.pending.clear()

    # -- budgets, records, result -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _wall_clock(self) -> AsyncIterator[None]:
        if self.budgets.max_seconds is None:
            yield
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() - (time.monotonic() - self._started) + self.budgets.max_seconds
        if loop.time() >= deadline:
            raise wall_time_exceeded(self.budgets, time.monotonic() - self._started)
        scope = asyncio.timeout_at(deadline)
        try:
            async with scope:
                yield
        except TimeoutError:
            if not scope.expired():
                raise
            raise wall_time_exceeded(self.budgets, time.monotonic() - self._started) from None

    async def _record_start(self, system: SystemMessage, task: UserMessage) -> None:
        self._logged = 2
        await self.trajectory.record(
            "run_start",
            provider=self.provider.name,
            budgets=self.budgets.model_dump(),
            tools=[t.name for t in self._offered_tools()],
            system=system.text,
            task=task.text,
        )

    async def _record_model_call(self, response: ModelResponse) -> None:
        new = [m.model_dump(mode="json") for m in self.messages[self._logged :]]
        self._logged = len(self.messages) + 1  # the answer is recorded below, not re-sent
        await self.trajectory.record(
            "model_call",
            step=self.steps,
            new_messages=new,
            text=response.text,
            tool_calls=[
                {"id": c.id, "name": c.name, "arguments": c.arguments_raw}
                for c in response.tool_calls
            ],
            stop_reason=response.stop_reason.value,
            usage=response.usage.model_dump(),
            latency_s=round(response.latency_s, 3),
            attempts=response.attempts,
            model=response.model,
            total_tokens=total_tokens(self.usage),
            total_cost_usd=round(self.usage.cost_usd, 6),
            truncated=response.stop_reason is StopReason.MAX_TOKENS,
        )

    def _result(self, stop: AgentStop) -> AgentResult:
        summary = stop.message if isinstance(stop, Finished) else ""
        return AgentResult(
            reason=stop.reason,
            message=self.masker.mask_text(stop.message),
            summary=summary,
            steps=self.steps,
            usage=self.usage,
            elapsed_s=time.monotonic() - self._started,
        )

    def _end_fields(self, result: AgentResult) -> dict[str, Any]:
        return {
            "reason": result.reason.value,
            "message": result.message,
            "summary": result.summary,
            "steps": result.steps,
            "total_tokens": total_tokens(result.usage),
            "total_cost_usd": round(result.usage.cost_usd, 6),
            "elapsed_s": round(result.elapsed_s, 3),
        }


def _where(path: Any) -> str:
    parts = [str(p) for p in path]
    return "/".join(parts) if parts else "(arguments)"
