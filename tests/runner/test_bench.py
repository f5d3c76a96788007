"""`forgehand bench runner --json` runs end to end (tiny sizes) and prints the agreed shape."""

from __future__ import annotations

import json
import subprocess
import sys


def test_runner_benchmark_prints_one_json_object() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "forgehand.cli.main",
            "bench",
            "runner",
            "--json",
            "--runs",
            "5",
            "--stream-mib",
            "4",
            "--reconnect-mib",
            "4",
            "--disconnects",
            "3",
        ],
        capture_output=True,
        timeout=300,
        check=True,
    )
    result = json.loads(done.stdout)
    rtt = result["exec_rtt_ms"]
    assert set(rtt) == {"runner_unix", "runner_unix_grpc", "runner_stdio_proxy", "host_subprocess"}
    assert all(set(v) == {"p50", "p99"} for v in rtt.values())
    assert set(result["stream_mb_s"]) == {"runner", "runner_grpc", "pipe"}
    for reconnect in (result["reconnect"], result["reconnect_grpc"]):
        assert reconnect["disconnects"] == 3
        assert reconnect["bytes_lost"] == 0
        assert reconnect["bytes_duplicated"] == 0
        assert reconnect["resume_ms_p50"] is not None
