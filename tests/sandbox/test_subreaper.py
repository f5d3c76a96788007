"""The subreaper's contract, for both of its implementations (``subreaper.c`` and its
Python fallback ``subreaper.py``): the command's exit code on stdout, the command's own
output on stderr, and every orphan reaped before it exits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgehand.sandbox import procs, rootfs, subreaper

SOURCE = Path(subreaper.__file__).with_suffix(".c")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler")
    binary = tmp_path_factory.mktemp("subreaper") / rootfs.COMPILED_SUBREAPER
    flags = ["-O2", "-Wall", "-Wextra", "-Werror"]
    subprocess.run([compiler, *flags, "-o", str(binary), str(SOURCE)], check=True)
    return binary


@pytest.fixture(params=["compiled", "script"])
def reaper(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    if request.param == "compiled":
        yield [str(request.getfixturevalue("compiled"))]
    else:
        yield [sys.executable, "-I", "-S", str(Path(subreaper.__file__))]


def run(reaper: list[str], *command: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*reaper, *command], capture_output=True, timeout=30)


def test_reports_the_exit_code_and_sends_output_to_stderr(reaper: list[str]) -> None:
    done = run(reaper, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (done.returncode, done.stdout) == (0, b"3\n")
    assert done.stderr == b"out\nerr\n"


def test_reports_a_killing_signal_as_negative(reaper: list[str]) -> None:
    done = run(reaper, "sh", "-c", "kill -KILL $$")
    assert (done.returncode, done.stdout) == (0, b"-9\n")


def test_a_command_that_cannot_start_is_127(reaper: list[str]) -> None:
    done = run(reaper, "/nonexistent/command")
    assert (done.returncode, done.stdout) == (1, b"127\n")
    assert b"cannot start /nonexistent/command" in done.stderr


def test_usage_without_a_command(reaper: list[str]) -> None:
    done = run(reaper)
    assert done.returncode == 2
    assert b"usage" in done.stderr


def test_reaps_orphans_and_exits_after_the_last(reaper: list[str]) -> None:
    """As ``runsc run --detach`` and conmon do: the command exits at once, leaving a
    daemon behind; the subreaper reports, then waits for and reaps the daemon."""
    with subprocess.Popen(
        [*reaper, "sh", "-c", "sleep 30 & echo $! >&2; exit 0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        assert process.stdout.readline() == b"0\n"
        orphan = int(process.stderr.readline())
        info = procs.read_process(orphan)
        assert info is not None
        assert info.ppid == process.pid  # re-parented to the subreaper
        assert process.poll() is None  # still waiting for it
        os.kill(orphan, 9)
        assert process.wait(timeout=30) == 0
    for _ in range(100):  # the kernel may report the reaped pid for a moment longer
        if procs.read_process(orphan) is None:
            break
        time.sleep(0.01)
    assert procs.read_process(orphan) is None  # reaped: no zombie left


def test_the_installed_compiled_subreaper_is_preferred() -> None:
    compiled = rootfs.compiled_subreaper()
    argv = rootfs.subreaper_argv(["true"])
    if compiled is None:
        assert argv[-2:] == [str(Path(subreaper.__file__)), "true"]
    else:
        assert argv == [str(compiled), "true"]
