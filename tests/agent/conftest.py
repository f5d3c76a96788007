"""Fixtures for the model side: providers pointed at a replay server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from forgehand.agent.config import AnthropicConfig, OpenAIConfig, parse_provider_config
from forgehand.agent.model import ModelProvider
from forgehand.agent.providers import build_provider
from forgehand.agent.replay import ReplayServer, Script
from forgehand.runner.client import LocalTransport, RunnerClient
from forgehand.runner.config import RunnerConfig
from forgehand.runner.core import RunnerCore
from forgehand.runner.keeper_client import stop_keeper

API_KEY = "sk-test-Zx9SECRETkey0123456789abcdef"
FAST_RETRY = {"max_retries": 3, "initial_backoff_s": 0.001, "max_backoff_s": 0.01}


def provider_config(
    kind: str, server: ReplayServer, **overrides: Any
) -> AnthropicConfig | OpenAIConfig:
    base_url = server.base_url if kind == "anthropic" else server.openai_base_url
    data: dict[str, Any] = {
        "type": kind,
        "model": f"{kind}-test-model",
        "base_url": base_url,
        "api_key": API_KEY,
        "timeout_s": 5.0,
        "retry": FAST_RETRY,
    }
    data.update(overrides)
    return parse_provider_config(data)


ProviderFactory = Callable[..., Any]


@pytest.fixture(params=["anthropic", "openai"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def serve(kind: str) -> ProviderFactory:
    """`async with serve(script_dict, **config) as (server, provider): ...`."""

    @asynccontextmanager
    async def run(
        script: dict[str, Any], **overrides: Any
    ) -> AsyncIterator[tuple[ReplayServer, ModelProvider]]:
        async with ReplayServer(Script.model_validate(script)) as server:
            provider = build_provider(provider_config(kind, server, **overrides), environ={})
            try:
                yield server, provider
            finally:
                await provider.aclose()

    return run


# -- the agent loop: a runner over a work dir, keepers that never outlive a test ----------


def kill_keepers_under(base: Path) -> None:
    """Stop runner keepers whose state dir lies under `base`."""
    for lock in base.rglob("keeper.lock"):
        stop_keeper(lock.parent)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory (the runner's unix sockets need short paths)."""
    path = Path(tempfile.mkdtemp(prefix="fha-", dir="/tmp"))
    yield path
    kill_keepers_under(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def runner(short_tmp: Path) -> AsyncIterator[tuple[RunnerClient, Path]]:
    """An in-process runner whose one root is `<short_tmp>/work`; yields (client, work)."""
    work = short_tmp / "work"
    work.mkdir()
    config = RunnerConfig(state_dir=short_tmp / "state", roots=(work,))
    async with RunnerCore(config) as core, RunnerClient(LocalTransport(core)) as client:
        yield client, work


def run_env() -> dict[str, str]:
    """The environment the CLI gives runs with --sandbox none (nothing secret)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=GIT_ENV
    )
    return result.stdout.strip()


GIT_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": "/nonexistent",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Dev",
    "GIT_AUTHOR_EMAIL": "dev@example.invalid",
    "GIT_COMMITTER_NAME": "Dev",
    "GIT_COMMITTER_EMAIL": "dev@example.invalid",
}

BUGGY_CALC = "def add(a, b):\n    return a - b\n"
CALC_TEST = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"


def make_python_repo(path: Path) -> Path:
    """A tiny repository whose one test fails until `calc.add` is fixed."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "calc.py").write_text(BUGGY_CALC)
    (path / "test_calc.py").write_text(CALC_TEST)
    (path / "AGENTS.md").write_text("Run the tests with python -m pytest -q.\n")
    git(path, "init", "-q", "-b", "main")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path
