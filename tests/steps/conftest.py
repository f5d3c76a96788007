"""Shared helpers for the step-language tests."""

from __future__ import annotations

import socket
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
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


class GitServer:
    """``git daemon`` on loopback serving the repositories made with ``add``."""

    def __init__(self, base: Path, url: str, process: subprocess.Popen[bytes]) -> None:
        self.base = base
        self.url = url
        self.process = process

    def add(self, name: str, files: dict[str, str], tag: str = "v1") -> str:
        """A repository ``name`` holding ``files`` (dedented), tagged ``tag``; its URL."""
        repo = self.base / name
        for relative, text in files.items():
            path = repo / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text).lstrip("\n"))
        git = ["git", "-C", str(repo), "-c", "user.name=T", "-c", "user.email=t@example.com"]
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", "steps"], check=True)
        subprocess.run([*git, "tag", tag], check=True)
        return f"{self.url}/{name}"

    def stop(self) -> None:
        """Stop serving (to show that later runs do not fetch)."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(500):
        if process.poll() is not None:
            raise RuntimeError(f"git daemon exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError("git daemon did not listen within 10 s")


@pytest.fixture
def git_server(tmp_path: Path) -> Iterator[GitServer]:
    """A git daemon on 127.0.0.1 (the git:// wire protocol), stopped afterwards."""
    base = tmp_path / "served"
    base.mkdir()
    port = _free_port()
    process = subprocess.Popen(
        [
            "git",
            "daemon",
            "--reuseaddr",
            "--export-all",
            "--informative-errors",
            f"--base-path={base}",
            "--listen=127.0.0.1",
            f"--port={port}",
            str(base),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = GitServer(base, f"git://127.0.0.1:{port}", process)
    try:
        _wait_listening(port, process)
        yield server
    finally:
        server.stop()
