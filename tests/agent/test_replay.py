"""The replay server itself: record mode, the command line, script loading."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from forgehand.agent.model import ToolResult
from forgehand.agent.providers import build_provider
from forgehand.agent.replay import RecordingProxy, ReplayServer, Script, ServerState

from .conftest import API_KEY, provider_config
from .test_providers import READ_FILE, START

SESSION = {
    "turns": [
        {
            "match": {"tools_offered": ["read_file"]},
            "reply": {
                "text": "Reading.",
                "tool_calls": [{"name": "read_file", "arguments": {"path": "README.md"}}],
                "usage": {"input_tokens": 50, "output_tokens": 10, "cache_read_tokens": 5},
            },
        },
        {"error": {"status": 429, "retry_after": "0", "message": "slow down"}},
        {
            "match": {"last_tool_result_contains": "contents"},
            "reply": {"text": f"Done, and the key was {API_KEY}."},
        },
    ]
}


async def _session(kind: str, base_url_of: ReplayServer | RecordingProxy) -> list[str]:
    config = provider_config(kind, base_url_of)  # type: ignore[arg-type]
    provider = build_provider(config, environ={})
    first = await provider.complete(START, [READ_FILE])
    result = ToolResult(tool_call_id=first.tool_calls[0].id, content="README contents")
    second = await provider.complete([*START, first.to_message(), result], [READ_FILE])
    await provider.aclose()
    return [first.text, first.tool_calls[0].name, second.text]


async def test_record_then_replay(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "recorded.yaml"
    async with ReplayServer(Script.model_validate(SESSION)) as upstream:
        async with RecordingProxy(upstream.base_url, output=out) as proxy:
            live = await _session(kind, proxy)
        assert proxy.state is ServerState.CLOSED
    text = out.read_text()
    assert API_KEY not in text
    assert "<redacted>" in text
    assert "authorization" not in text.lower()

    recorded = Script.load(out)
    assert [t.error.status for t in recorded.turns if t.error] == [429]
    async with ReplayServer(recorded) as replay:
        replayed = await _session(kind, replay)
    assert replayed == [*live[:2], "Done, and the key was <redacted>."]
    assert replay.remaining == 0
    assert replay.mismatches == []


async def test_recording_proxy_reports_an_unreachable_upstream(kind: str) -> None:
    async with ReplayServer(Script(turns=[])) as gone:
        dead_url = gone.base_url
    async with RecordingProxy(dead_url) as proxy:
        config = provider_config(kind, proxy, retry={"max_retries": 0})  # type: ignore[arg-type]
        provider = build_provider(config, environ={})
        with pytest.raises(Exception, match="cannot reach"):
            await provider.complete(START)
        await provider.aclose()
    assert proxy.script().turns == []


async def test_command_line_serves_a_script(tmp_path: Path, kind: str) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"turns": [{"reply": {"text": "from the CLI"}}]}))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "forgehand.agent.replay",
        "--script",
        str(script),
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        base_url = (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
        assert base_url.startswith("http://127.0.0.1:")
        data = {
            "type": kind,
            "model": "m",
            "api_key": API_KEY,
            "base_url": base_url if kind == "anthropic" else f"{base_url}/v1",
        }
        from forgehand.agent.config import parse_provider_config

        provider = build_provider(parse_provider_config(data), environ={})
        response = await provider.complete(START)
        await provider.aclose()
    finally:
        process.terminate()
        await process.wait()
    assert response.text == "from the CLI"
    assert process.returncode == 0


def test_turn_needs_one_answer() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Script.model_validate({"turns": [{"match": {}}]})


def test_script_round_trips_through_yaml(tmp_path: Path) -> None:
    script = Script.model_validate(SESSION)
    path = tmp_path / "s.yaml"
    path.write_text(script.dump())
    assert Script.load(path) == script
