"""The agent loop over the real SDKs and the replay server, with the deterministic fake executor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from forgehand.agent.budget import Budgets
from forgehand.agent.exceptions import EndReason
from forgehand.agent.fake_executor import FakeCommand, FakeToolExecutor
from forgehand.agent.loop import Agent, AgentResult, AgentSettings
from forgehand.agent.model import SystemMessage, UserMessage
from forgehand.agent.providers import build_provider
from forgehand.agent.replay import ReplayServer, Script
from forgehand.agent.trajectory import Trajectory, read_trajectory
from forgehand.steps.masking import Masker

from .conftest import API_KEY, provider_config

SYSTEM = SystemMessage(text="You fix issues.")
TASK = UserMessage(text="Fix issue #7: add() subtracts")
FILES = {"calc.py": "def add(a, b):\n    return a - b\n", "README.md": "# calc\n"}


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


def turn(*calls: dict[str, Any], text: str = "", **match: Any) -> dict[str, Any]:
    reply: dict[str, Any] = {"text": text, "tool_calls": list(calls)}
    reply["usage"] = {"input_tokens": 100, "output_tokens": 20}
    return {"match": match, "reply": reply}


FINISH = turn(call("finish", summary="Fixed add()."))


@dataclass
class Outcome:
    result: AgentResult
    server: ReplayServer
    records: list[dict[str, Any]]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["type"] == kind]


async def drive(
    kind: str,
    turns: list[dict[str, Any]],
    tmp_path: Path,
    executor: FakeToolExecutor | None = None,
    **options: Any,
) -> Outcome:
    path = tmp_path / "trajectory.jsonl"
    config_overrides = options.pop("config", {})
    async with ReplayServer(Script.model_validate({"turns": turns})) as server:
        provider = build_provider(provider_config(kind, server, **config_overrides), environ={})
        agent = Agent(
            provider,
            executor or FakeToolExecutor(files=dict(FILES)),
            trajectory=Trajectory(path, Masker([API_KEY])),
            secrets=[API_KEY],
            **options,
        )
        try:
            result = await agent.run(SYSTEM, TASK)
        finally:
            await provider.aclose()
    assert server.mismatches == [], server.mismatches[0].message()
    return Outcome(result, server, list(read_trajectory(path)))


async def test_reads_edits_and_finishes(kind: str, tmp_path: Path) -> None:
    executor = FakeToolExecutor(files=dict(FILES))
    outcome = await drive(
        kind,
        [
            turn(call("read_file", path="calc.py"), tools_offered=["read_file", "finish"]),
            turn(
                call("edit_file", path="calc.py", old_text="a - b", new_text="a + b"),
                last_tool_result_contains="return a - b",
            ),
            {**FINISH, "match": {"last_tool_result_contains": "replaced 1 occurrence"}},
        ],
        tmp_path,
        executor,
    )
    assert outcome.result.finished
    assert outcome.result.summary == "Fixed add()."
    assert outcome.result.steps == 3
    assert executor.files["calc.py"] == "def add(a, b):\n    return a + b\n"
    assert [r["type"] for r in outcome.records] == [
        "run_start",
        *["model_call", "tool_call"] * 3,
        "run_end",
    ]


async def test_failing_tool_call_is_answered_and_the_agent_recovers(
    kind: str, tmp_path: Path
) -> None:
    outcome = await drive(
        kind,
        [
            turn(call("read_file", path="calc_py.py")),
            turn(call("list_files"), last_tool_result_contains="no file 'calc_py.py'"),
            turn(call("read_file", path="calc.py"), last_tool_result_contains="calc.py ("),
            {**FINISH, "match": {"last_tool_result_contains": "return a - b"}},
        ],
        tmp_path,
    )
    assert outcome.result.finished
    first = outcome.of("tool_call")[0]
    assert first["is_error"] is True
    if kind == "anthropic":
        blocks = outcome.server.requests[1].body["messages"][-1]["content"]
        assert blocks[0]["is_error"] is True


@pytest.mark.parametrize(
    ("bad_call", "expected"),
    [
        ({"name": "read_file", "arguments_raw": '{"path": "calc.py"'}, "not valid JSON"),
        ({"name": "frobnicate", "arguments": {"x": 1}}, "there is no tool 'frobnicate'"),
        ({"name": "read_file", "arguments": {"paths": 1}}, "break the schema"),
        ({"name": "read_file", "arguments": {"path": 7}}, "7 is not of type 'string'"),
    ],
)
async def test_malformed_tool_calls_get_an_error_message(
    kind: str, tmp_path: Path, bad_call: dict[str, Any], expected: str
) -> None:
    executor = FakeToolExecutor(files=dict(FILES))
    outcome = await drive(
        kind,
        [turn(bad_call), {**FINISH, "match": {"last_tool_result_contains": expected}}],
        tmp_path,
        executor,
    )
    assert outcome.result.finished
    assert executor.calls == []  # nothing malformed reached the executor
    assert outcome.of("tool_call")[0]["is_error"] is True


async def test_step_budget_ends_the_run_with_its_reason(kind: str, tmp_path: Path) -> None:
    outcome = await drive(
        kind,
        [turn(call("list_files")), turn(call("list_files"))],
        tmp_path,
        budgets=Budgets(max_steps=2),
    )
    assert outcome.result.reason is EndReason.MAX_STEPS
    assert not outcome.result.finished
    assert "--max-steps" in outcome.result.message
    assert outcome.of("run_end")[0]["reason"] == "max_steps"
    assert outcome.server.remaining == 0


async def test_cost_budget(kind: str, tmp_path: Path) -> None:
    prices = {"input_per_mtok": 10_000.0, "output_per_mtok": 0.0}  # 100 tokens = $1
    outcome = await drive(
        kind,
        [turn(call("list_files")), turn(call("list_files")), FINISH],
        tmp_path,
        budgets=Budgets(max_cost_usd=1.5),
        config={"prices": prices},
    )
    assert outcome.result.reason is EndReason.MAX_COST
    assert outcome.result.usage.cost_usd == pytest.approx(2.0)
    assert outcome.server.remaining == 1


async def test_token_budget(tmp_path: Path) -> None:
    outcome = await drive(
        "openai", [turn(call("list_files")), FINISH], tmp_path, budgets=Budgets(max_tokens=100)
    )
    assert outcome.result.reason is EndReason.MAX_TOKENS


async def test_429_then_success(kind: str, tmp_path: Path) -> None:
    outcome = await drive(
        kind, [{"error": {"status": 429, "retry_after": "0.01"}}, FINISH], tmp_path
    )
    assert outcome.result.finished
    assert outcome.of("model_call")[0]["attempts"] == 2


async def test_provider_failure_ends_the_run(tmp_path: Path) -> None:
    outcome = await drive("anthropic", [{"error": {"status": 401}}], tmp_path)
    assert outcome.result.reason is EndReason.MODEL_ERROR
    assert "ANTHROPIC_API_KEY" in outcome.result.message
    assert API_KEY not in outcome.result.message


async def test_text_without_tool_call_gets_a_nudge(tmp_path: Path) -> None:
    outcome = await drive(
        "anthropic",
        [
            turn(text="I think it is fixed."),
            {**FINISH, "match": {"last_message_contains": "call finish"}},
        ],
        tmp_path,
    )
    assert outcome.result.finished


async def test_long_command_yields_and_is_polled(kind: str, tmp_path: Path) -> None:
    executor = FakeToolExecutor(commands={"make test": FakeCommand("all good", 0, polls=2)})
    outcome = await drive(
        kind,
        [
            turn(call("run", command="make test")),
            turn(
                call("wait", handle="cmd-1"),
                last_tool_result_contains="still running",
                tools_offered=["wait", "send_input", "cancel"],
            ),
            turn(call("send_input", handle="cmd-1", text="y\n")),
            {**FINISH, "match": {"last_tool_result_contains": "all good"}},
        ],
        tmp_path,
        executor,
    )
    assert outcome.result.finished
    assert executor.inputs == {"cmd-1": ["y\n"]}
    offered = [tool_names(r.body) for r in outcome.server.requests]
    assert "wait" not in offered[0]
    assert "wait" in offered[1]
    assert "wait" not in offered[-1]  # the command has ended


def tool_names(body: dict[str, Any]) -> list[str]:
    return [t.get("function", t)["name"] for t in body.get("tools", [])]


async def test_wait_is_not_offered_without_a_pending_command(tmp_path: Path) -> None:
    outcome = await drive(
        "anthropic",
        [
            turn(call("wait", handle="cmd-9")),
            {**FINISH, "match": {"last_tool_result_contains": "no tool 'wait'"}},
        ],
        tmp_path,
    )
    assert outcome.result.finished


async def test_large_output_is_clipped_and_paged(tmp_path: Path) -> None:
    big = "".join(f"line {n:05d}\n" for n in range(3000))
    executor = FakeToolExecutor(files={"big.txt": big})
    outcome = await drive(
        "anthropic",
        [
            turn(call("read_file", path="big.txt")),
            turn(
                call("page_output", handle="out-1", offset=8000),
                last_tool_result_contains="page_output(handle='out-1'",
            ),
            {**FINISH, "match": {"last_tool_result_contains": "next offset"}},
        ],
        tmp_path,
        executor,
        settings=AgentSettings(max_output_chars=4000, page_chars=2000),
    )
    assert outcome.result.finished
    first, second = outcome.of("tool_call")[:2]
    assert len(first["output"]) < 4500
    assert first["output_chars"] > 40_000
    assert "characters 8000-10000 of" in second["output"]


async def test_old_outputs_are_trimmed_as_the_context_fills(tmp_path: Path) -> None:
    files = {f"f{n}.txt": f"{n}" * 12_000 for n in range(6)}
    executor = FakeToolExecutor(files=files)
    reads = [turn(call("read_file", path=f"f{n}.txt")) for n in range(6)]
    outcome = await drive(
        "openai",
        [*reads, FINISH],
        tmp_path,
        executor,
        settings=AgentSettings(context_tokens=8000, max_output_chars=13_000),
    )
    assert outcome.result.finished
    assert outcome.of("context_trimmed")
    last = outcome.server.requests[-1].text
    assert len(last) < 8000 * 4 + 10_000
    assert "older output trimmed" in last


async def test_trajectory_masks_the_key_and_records_usage(tmp_path: Path) -> None:
    files = {"leak.txt": f"key={API_KEY}\n"}
    outcome = await drive(
        "anthropic",
        [
            turn(call("read_file", path="leak.txt")),
            {**FINISH, "match": {"last_tool_result_contains": "[MASKED]"}},
        ],
        tmp_path,
        FakeToolExecutor(files=files),
    )
    assert outcome.result.finished
    text = (tmp_path / "trajectory.jsonl").read_text()
    assert API_KEY not in text
    assert all(API_KEY not in r.text for r in outcome.server.requests)
    first, second = outcome.of("model_call")
    assert first["usage"]["input_tokens"] == 100
    assert first["new_messages"] == []  # system prompt and task are in run_start
    assert [m["role"] for m in second["new_messages"]] == ["tool"]
    assert "[MASKED]" in second["new_messages"][0]["content"]
