"""The command line, as a person uses it: `forgehand-runner serve` and `forgehand runner …`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

FORGEHAND = [sys.executable, "-m", "forgehand.cli.main"]
RUNNER = [sys.executable, "-m", "forgehand.runner.cli"]


@pytest.fixture
def socket(short_tmp: Path) -> Iterator[Path]:
    path = short_tmp / "r.sock"
    (short_tmp / "work").mkdir()
    daemon = subprocess.Popen(
        [
            *RUNNER,
            "serve",
            "--socket",
            str(path),
            "--state-dir",
            str(short_tmp / "state"),
            "--root",
            str(short_tmp / "work"),
        ],
        stderr=subprocess.PIPE,
    )
    assert daemon.stderr is not None
    assert b"serving on" in daemon.stderr.readline()
    yield path
    daemon.terminate()
    daemon.wait(timeout=15)
    daemon.stderr.close()


def forgehand(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*FORGEHAND, *args], input=stdin, capture_output=True, timeout=60)


def test_exec_is_byte_exact_and_exits_with_the_runs_code(socket: Path) -> None:
    script = r"printf 'a\000b\377'; printf 'to-stderr' >&2; exit 5"
    done = forgehand("runner", "exec", "--socket", str(socket), "--", "sh", "-c", script)
    assert done.stdout == b"a\x00b\xff"
    assert done.stderr == b"to-stderr"
    assert done.returncode == 5


def test_start_then_attach(socket: Path) -> None:
    started = forgehand(
        "runner",
        "start",
        "--socket",
        str(socket),
        "--id",
        "cli-run",
        "--",
        "sh",
        "-c",
        "echo one; echo two",
    )
    assert started.returncode == 0
    assert started.stdout == b"cli-run\n"
    attached = forgehand("runner", "attach", "--socket", str(socket), "cli-run")
    assert attached.stdout == b"one\ntwo\n"
    assert attached.returncode == 0
    again = forgehand("runner", "attach", "--socket", str(socket), "cli-run", "--after", "2")
    assert again.stdout in (b"two\n", b"")  # depends on how output was chunked
    status = forgehand("runner", "status", "--socket", str(socket), "cli-run")
    assert b"exited" in status.stdout


def test_exec_forwards_stdin(socket: Path) -> None:
    done = forgehand(
        "runner", "exec", "--socket", str(socket), "--stdin", "--", "wc", "-c", stdin=b"12345"
    )
    assert done.stdout.strip() == b"5"


def test_signal_and_timeout_map_to_exit_codes(socket: Path) -> None:
    done = forgehand(
        "runner", "exec", "--socket", str(socket), "--timeout", "0.2", "--", "sleep", "10"
    )
    assert done.returncode == 128 + 15
    assert b"timeout" in done.stderr


def test_errors_are_reported_not_raised(socket: Path) -> None:
    missing = forgehand("runner", "attach", "--socket", str(socket), "no-such-run")
    assert missing.returncode == 125
    assert b"no run 'no-such-run'" in missing.stderr
    assert b"Traceback" not in missing.stderr
    nothing = forgehand("runner", "exec", "--socket", str(socket))
    assert nothing.returncode == 125
    assert b"give the command" in nothing.stderr


def test_no_daemon_gives_a_clear_message(short_tmp: Path) -> None:
    done = subprocess.run(
        [*FORGEHAND, "runner", "exec", "--socket", str(short_tmp / "nothing.sock"), "--", "true"],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 125
    assert b"unreachable" in done.stderr
    assert b"Traceback" not in done.stderr


def test_proxy_bridges_stdio(socket: Path) -> None:
    # An HTTP/2 client preface through the proxy gets the server's SETTINGS frame back.
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    done = subprocess.run(
        [*RUNNER, "proxy", "--socket", str(socket)],
        input=preface,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0
    assert done.stdout[3:4] == b"\x04"  # first frame from the server is SETTINGS


def test_serve_refuses_tcp_without_tls(short_tmp: Path) -> None:
    done = subprocess.run(
        [*RUNNER, "serve", "--state-dir", str(short_tmp / "s"), "--tcp", "127.0.0.1:0"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert b"TLS" in done.stderr
