"""How gVisor's ways of running out of memory reach the agent and the run.

The OOM killer either ends the whole sandbox (it picked the Sentry): the run ends with the
sandbox's own account, not the runner client's "stayed unreachable". Or it picks the stub
process holding a command's memory: the command only exits 1, the runner inside cannot
see the host's cgroup, and the agent's tool outcome says what the host counted."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from forgehand.agent.runner_executor import OOM_NOTE, RunnerToolExecutor
from forgehand.agent.workspaces import open_workspace, scratch_dir
from forgehand.sandbox import procs
from forgehand.sandbox.gvisor import GVisorConfig, check_host
from forgehand.workflow.model import Outcome, Phase, RunRecord

from .conftest import FINISH, FIX, Scenario, scripted


def _gvisor_problem() -> str:
    try:
        check_host(GVisorConfig())
    except Exception as exc:
        return str(exc)
    return ""


pytestmark = [
    pytest.mark.needs_root,
    pytest.mark.slow,
    pytest.mark.skipif(bool(_gvisor_problem()), reason=f"gvisor unavailable: {_gvisor_problem()}"),
]


async def test_a_command_the_oom_killer_ended_says_so_to_the_agent(short_tmp: Path) -> None:
    hog = "python3 -c 'x = []\nwhile True: x.append(bytearray(50 << 20))'"
    async with scratch_dir() as scratch, open_workspace("gvisor", scratch) as space:
        assert space.oom_kills is not None
        tools = RunnerToolExecutor(
            space.client, space.sandbox_dir, env=space.env, oom_kills=space.oom_kills
        )
        outcome = await tools.call("run", {"command": hog}, yield_after=120)
        assert outcome.text.endswith(OOM_NOTE), outcome.text
        assert outcome.exit_code == 1
        after = await tools.call("run", {"command": "echo alive"}, yield_after=30)
        assert after.text.startswith("alive")
        assert OOM_NOTE not in after.text


def _sentries() -> set[int]:
    table = procs.snapshot()
    return {pid for pid in table if procs.cmdline(pid).startswith("runsc-sandbox")}


async def test_a_sandbox_that_ends_under_the_agent_is_reported_as_such(
    scenario: Scenario,
) -> None:
    before = _sentries()
    killed: list[int] = []

    async def kill_the_sentry(_record: RunRecord, phase: Phase) -> None:
        if phase is Phase.BASELINE:  # the agent's sandbox is up: end it as an OOM would
            for pid in _sentries() - before:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    script = scripted(FIX, FINISH)
    async with scenario.workflow(script, sandbox="gvisor", after_phase=kill_the_sentry) as (
        workflow,
        _,
    ):
        record = await workflow.solve(scenario.ref)
    assert killed
    assert record.outcome is Outcome.SANDBOX_FAULT
    assert record.message.startswith("the sandbox ended on its own (exited: "), record.message
    comments = await scenario.forge.list_comments(scenario.ref.number)
    assert "the sandbox ended on its own" in comments[-1].body
