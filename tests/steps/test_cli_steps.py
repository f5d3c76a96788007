"""``forgehand steps check|list|run`` as subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import WriteStep

from forgehand.steps.builtins import FAMILIES

FIXTURES = Path(__file__).parent / "fixtures" / "gitlab"


def _forgehand(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cwd or Path.cwd())}
    return subprocess.run(
        [sys.executable, "-m", "forgehand.cli.main", "steps", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_check_clean_files(tmp_path: Path) -> None:
    done = _forgehand("check", str(FIXTURES / "tutorial_outputs"), str(FIXTURES / "export_env"))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_check_reports_positions(write_step: WriteStep) -> None:
    bad = write_step(
        "bad.yml",
        """
        spec:
        ---
        run:
          - name: read
            step: builtin://read_file
            inputs:
              start_line: ${{ inputs.missing }}
        """,
    )
    unresolved = write_step(
        "unresolved.yml", "spec:\n---\nrun:\n  - name: x\n    step: builtin://nope\n"
    )
    done = _forgehand("check", str(bad), str(unresolved))
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0] == f"{bad}:5:11: step 'read' needs input(s) path"
    assert lines[1] == f"{bad}:7:19: unknown input 'missing' (inputs: none declared)"
    assert lines[2].startswith(f"{unresolved}:5:11: unknown builtin step 'nope' (known: edit_file")
    assert len(lines) == 3


def test_list_json_has_every_builtin_and_repo_steps(tmp_path: Path) -> None:
    steps = tmp_path / "repo" / ".forgehand" / "steps"
    (steps / "lint").mkdir(parents=True)
    (steps / "lint" / "func.yml").write_text(
        "spec:\n  description: Run the linter.\n---\nexec:\n  command: [ruff, check]\n"
    )
    (steps / "broken.yml").write_text("spec:\n---\nexec: nope\n")
    (steps / "run.yml").write_text("spec:\n---\nexec:\n  command: ['true']\n")
    done = _forgehand("list", "--repo", str(tmp_path / "repo"), "--json")
    assert done.returncode == 0, done.stderr
    tools = json.loads(done.stdout)
    names = [tool["name"] for tool in tools]
    assert names == [*sorted(FAMILIES), "lint"]
    read = tools[names.index("read_file")]
    assert read["input_schema"]["required"] == ["path"]
    assert read["input_schema"]["properties"]["start_line"] == {
        "type": "number",
        "description": "First line to return (1-based).",
        "default": 1,
    }
    assert tools[-1]["description"] == "Run the linter."
    assert "broken.yml" in done.stderr
    assert "exec must be a mapping" in done.stderr
    assert "tool name 'run' is a built-in; rename it" in done.stderr


def test_list_plain(tmp_path: Path) -> None:
    done = _forgehand("list")
    assert done.returncode == 0
    assert done.stdout.splitlines()[0].startswith("edit_file: Replace one exact occurrence")


def test_run_builtin_prints_output_then_outputs(tmp_path: Path) -> None:
    done = _forgehand(
        "run", "builtin://run", "--input", "command=echo hello", "--work-dir", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("hello\n")
    assert json.loads(done.stdout.removeprefix("hello\n")) == {"exit_code": 0, "timed_out": False}


def test_run_file_with_json_inputs(tmp_path: Path) -> None:
    done = _forgehand(
        "run",
        str(FIXTURES / "function_inputs"),
        "-i",
        "message=hi",
        "-i",
        "count=2",
        "-i",
        'config={"a": [1]}',
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == 'hi x 2 with {"a":[1]}'


def test_run_relative_file_and_failure(tmp_path: Path) -> None:
    (tmp_path / "fail.yml").write_text("spec:\n---\nrun:\n  - name: x\n    script: exit 4\n")
    done = _forgehand("run", "fail.yml", cwd=tmp_path)
    assert done.returncode == 1
    assert json.loads(done.stdout) == {}
    assert "step failed: step 'x' failed: script exited with code 4" in done.stderr


def test_run_usage_errors(tmp_path: Path) -> None:
    unreachable = _forgehand("run", "git://127.0.0.1:9/steps@v1", "--sandbox", "bwrap")
    assert unreachable.returncode == 1
    assert "cannot fetch git://127.0.0.1:9/steps@v1" in unreachable.stderr
    bad_input = _forgehand("run", "builtin://run", "-i", "novalue")
    assert bad_input.returncode == 2
    assert "--input takes NAME=VALUE" in bad_input.stderr
    bad_dir = _forgehand("run", "builtin://run", "--work-dir", str(tmp_path / "missing"))
    assert bad_dir.returncode == 2


@pytest.mark.skipif(
    shutil.which("bwrap") is None or os.geteuid() != 0,
    reason="the bubblewrap backend needs root and the `bubblewrap` package",
)
def test_run_inside_a_bubblewrap_sandbox(tmp_path: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="fh-steps-", dir="/tmp"))
    try:
        work.chmod(0o755)
        (work / "notes.txt").write_text("one\ntwo\n")
        builtin = _forgehand(
            "run",
            "builtin://read_file",
            "-i",
            "path=notes.txt",
            "--work-dir",
            str(work),
            "--sandbox",
            "bwrap",
        )
        assert builtin.returncode == 0, builtin.stderr
        assert "two" in json.loads(builtin.stdout)["content"]
        tutorial = _forgehand(
            "run",
            str(FIXTURES / "tutorial_outputs"),
            "--work-dir",
            str(work),
            "--sandbox",
            "bwrap",
        )
        assert tutorial.returncode == 0, tutorial.stderr
        assert "gitlab steps" in json.loads(tutorial.stdout)["all_greetings"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
