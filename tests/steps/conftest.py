"""Shared helpers for the step-language tests."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forgehand.steps import MemorySink, StepEngine, StepResult, StepStatus

WriteStep = Callable[[str, str], Path]


@pytest.fixture
def write_step(tmp_path: Path) -> WriteStep:
    """Write a dedented step file under tmp_path and return its path."""

    def write(relative: str, text: str) -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


class BuiltinCaller:
    """Runs built-in steps in a work dir through the real engine, keeping what they emit."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.sink = MemorySink()

    async def __call__(self, name: str, /, **inputs: Any) -> StepResult:
        engine = StepEngine(work_dir=self.work_dir, sink=self.sink)
        return await engine.run(f"builtin://{name}", inputs)

    async def ok(self, name: str, /, **inputs: Any) -> dict[str, Any]:
        """Outputs of a call that must succeed."""
        result = await self(name, **inputs)
        assert result.status is StepStatus.SUCCEEDED, result.error
        return dict(result.outputs)

    async def error(self, name: str, /, **inputs: Any) -> str:
        """The error of a call that must fail."""
        result = await self(name, **inputs)
        assert result.status is StepStatus.FAILED, result.outputs
        assert result.error is not None
        return result.error


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """An empty work dir."""
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def builtin(work: Path) -> BuiltinCaller:
    """Call built-in steps in ``work``."""
    return BuiltinCaller(work)
