"""``python -m forgehand.steps.engine`` as the runner starts it: stdin request, fds 1/2/3."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.steps.event_wire import FRAME, KINDS, encode_step_event

FIXTURES = Path(__file__).parent / "fixtures" / "gitlab"
# fd 3 is opened by the shell, as the runner will open it; "$0" is this Python.
WITH_EVENTS = 'exec "$0" -m forgehand.steps.engine 3>"$1"'


def _engine(request: Any, events: Path | None, **popen: Any) -> subprocess.Popen[bytes]:
    argv = (
        ["sh", "-c", WITH_EVENTS, sys.executable, str(events)]
        if events is not None
        else [sys.executable, "-m", "forgehand.steps.engine"]
    )
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen
    )
    assert process.stdin is not None
    data = request if isinstance(request, bytes) else json.dumps(request).encode()
    process.stdin.write(data)
    process.stdin.close()
    process.stdin = None
    return process


def _finish(process: subprocess.Popen[bytes]) -> tuple[int, bytes, bytes]:
    stdout, stderr = process.communicate(timeout=60)
    return process.returncode, stdout, stderr


def _events(path: Path) -> list[dict[str, Any]]:
    """The engine's StepEvent frames, read back with protobuf, as the dicts it sent."""
    data, events, types = path.read_bytes(), [], {v: k for k, v in KINDS.items()}
    while data:
        (length,) = FRAME.unpack_from(data)
        step = pb.StepEvent.FromString(data[FRAME.size : FRAME.size + length])
        data = data[FRAME.size + length :]
        event: dict[str, Any] = {"type": types[step.kind]}
        if step.kind == pb.StepEvent.KIND_RESULT:
            event["result"] = json.loads(step.result_json)
        else:
            event.update(path=list(step.path), status=step.status, error=step.error)
            event["outputs"] = json.loads(step.outputs_json) if step.outputs_json else None
            event["exit_code"] = step.exit_code
        events.append(event)
    return events


def test_builtin_success_with_events_on_fd3(work: Path, tmp_path: Path) -> None:
    (work / "a.txt").write_text("hi\n")
    events = tmp_path / "events.bin"
    request = {"ref": "builtin://read_file", "inputs": {"path": "a.txt"}, "work_dir": str(work)}
    code, stdout, stderr = _finish(_engine(request, events))
    assert (code, stdout, stderr) == (0, b"", b"")
    lines = _events(events)
    assert [e["type"] for e in lines] == ["step_started", "step_finished", "result"]
    result = lines[-1]["result"]
    assert result["status"] == "succeeded"
    assert result["outputs"]["content"] == "     1\thi\n"
    assert result["name_path"] == []


def test_output_is_passed_through_byte_for_byte(work: Path, tmp_path: Path) -> None:
    request = {
        "ref": "builtin://run",
        "inputs": {"command": r"printf 'a\000b\377\r\n'; printf 'e\n' >&2"},
        "work_dir": str(work),
        "env": {"PATH": "/usr/bin:/bin"},
    }
    code, stdout, stderr = _finish(_engine(request, tmp_path / "ev"))
    assert (code, stdout, stderr) == (0, b"a\x00b\xff\r\n", b"e\n")


def test_failed_step_exits_1_with_result_last(work: Path, tmp_path: Path) -> None:
    events = tmp_path / "events.bin"
    request = {
        "ref": str(FIXTURES / "tutorial_outputs"),
        "work_dir": str(work),
        "env": {"PATH": str(work)},  # no bash: the hello step cannot start
    }
    code, _, _ = _finish(_engine(request, events))
    assert code == 1
    last = _events(events)[-1]
    assert last["type"] == "result"
    assert last["result"]["status"] == "failed"
    assert last["result"]["children"][0]["error"].startswith("cannot start 'bash'")


def test_sensitive_input_masked_everywhere(work: Path, tmp_path: Path) -> None:
    events = tmp_path / "events.bin"
    request = {
        "ref": str(FIXTURES / "sensitive_outputs"),
        "inputs": {"secret_override": "hunter22"},
        "work_dir": str(work),
    }
    code, stdout, _ = _finish(_engine(request, events))
    assert code == 0
    assert b"hunter22" not in stdout
    assert b"[MASKED]" in stdout
    assert b"hunter22" not in events.read_bytes()


def test_without_fd3_events_go_nowhere(work: Path) -> None:
    request = {"ref": "builtin://run", "inputs": {"command": "echo ok"}, "work_dir": str(work)}
    assert _finish(_engine(request, None)) == (0, b"ok\n", b"")


@pytest.mark.parametrize(
    ("request_data", "message"),
    [
        (b"not json", "stdin is not one JSON object"),
        (b"[]", "the request must be a JSON object"),
        ({"work_dir": "/"}, "ref must be a non-empty string"),
        ({"ref": "builtin://run"}, "work_dir must be the absolute path of an existing directory"),
        ({"ref": "builtin://run", "work_dir": "relative"}, "work_dir must be an absolute path"),
        ({"ref": "x", "work_dir": "/", "extra": 1}, "unknown keys ['extra']"),
        ({"ref": "x", "work_dir": "/", "env": {"A": 1}}, "env values must be strings"),
        ({"ref": "x", "work_dir": "/", "inputs": []}, "inputs must be a JSON object"),
    ],
)
def test_bad_request_exits_2(request_data: Any, message: str) -> None:
    code, stdout, stderr = _finish(_engine(request_data, None))
    assert (code, stdout) == (2, b"")
    assert stderr.decode().startswith("forgehand step engine: bad request: ")
    assert message in stderr.decode()


def test_sigterm_cancels_the_step(work: Path, tmp_path: Path) -> None:
    events = tmp_path / "events.bin"
    request = {
        "ref": "builtin://run",
        "inputs": {"command": "echo started; sleep 30"},
        "work_dir": str(work),
    }
    process = _engine(request, events)
    assert process.stdout is not None
    assert process.stdout.readline() == b"started\n"
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code, _, _ = _finish(process)
    assert time.monotonic() - started < 10
    assert code == 1
    lines = _events(events)
    assert lines[-2]["status"] == "cancelled"
    assert lines[-1]["result"]["status"] == "cancelled"


def test_engine_import_stays_small() -> None:
    probe = (
        "import sys, forgehand.steps.engine as e; "
        "heavy = [m for m in ('forgehand.steps.checker', 'forgehand.steps.builtins.git', "
        "'forgehand.steps.builtins.files', 'forgehand.runner') if m in sys.modules]; "
        "print(heavy)"
    )
    output = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert output.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "event",
    [
        {"type": "step_started", "path": ["a", 2]},
        {
            "type": "step_finished",
            "path": ["a"],
            "status": "failed",
            "outputs": {"k": "v"},
            "exit_code": -1,
            "error": "boom \udc80",
        },
        {"type": "step_finished", "path": [], "status": "succeeded", "exit_code": 1 << 40},
        {"type": "result", "result": {"status": "succeeded", "children": []}},
    ],
)
def test_event_frames_parse_as_step_events(event: dict[str, Any]) -> None:
    frame = encode_step_event(event)
    assert frame is not None
    (length,) = FRAME.unpack_from(frame)
    assert length == len(frame) - FRAME.size
    step = pb.StepEvent.FromString(frame[FRAME.size :])
    assert step.kind == KINDS[event["type"]]
    if event["type"] == "result":
        assert json.loads(step.result_json) == event["result"]
        return
    assert list(step.path) == [str(p) for p in event["path"]]
    assert step.status == event.get("status", "")
    assert step.exit_code == (event.get("exit_code", 0) if event.get("exit_code") != 1 << 40 else 0)
    assert step.error == event.get("error", "").replace("\udc80", "?")
    assert (json.loads(step.outputs_json) if step.outputs_json else None) == event.get("outputs")


def test_unknown_event_types_make_no_frame() -> None:
    assert encode_step_event({"type": "mystery"}) is None
