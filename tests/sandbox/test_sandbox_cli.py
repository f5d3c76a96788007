"""``forgehand sandbox run|ls|gc``, ``forgehand doctor`` and ``forgehand bench sandbox``
as a user runs them: real processes, real bwrap sandboxes (and gVisor and podman ones
where a limit breach must say why)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from bwrap_support import NEEDS_BWRAP
from sandbox_support import needs_backend

from forgehand.sandbox.gvisor import GVisorConfig
from forgehand.sandbox.gvisor import check_host as check_gvisor
from forgehand.sandbox.podman import PodmanConfig
from forgehand.sandbox.podman import check_host as check_podman

pytestmark = NEEDS_BWRAP


def forgehand(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-m", "forgehand.cli.main", *args]
    return subprocess.run(argv, capture_output=True, timeout=timeout, check=False)


def test_run_copies_output_byte_exact_and_exits_with_the_code() -> None:
    done = forgehand(
        "sandbox",
        "run",
        "--backend",
        "bwrap",
        "--",
        "sh",
        "-c",
        'printf "a\\0b"; printf "e\\n" >&2; exit 7',
    )
    assert (done.returncode, done.stdout, done.stderr) == (7, b"a\0b", b"e\n")


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(("bwrap", "process"), id="bwrap"),
        pytest.param(
            ("gvisor", "kernel"),
            id="gvisor",
            marks=needs_backend("gvisor", lambda: check_gvisor(GVisorConfig())),
        ),
        pytest.param(
            ("podman", "container"),
            id="podman",
            marks=needs_backend("podman", lambda: check_podman(PodmanConfig())),
        ),
    ],
)
def test_limit_breach_prints_the_reason(backend: tuple[str, str]) -> None:
    """Also where the breach ends the whole sandbox (gVisor), even before the run's start
    is answered: the reason, not a runner that stayed unreachable."""
    name, isolation = backend
    done = forgehand(
        *("sandbox", "run", "--backend", name, "--isolation", isolation, "--memory", "64M"),
        *("--", "python3", "-c", "x = [bytearray(16 << 20) for _ in range(64)]"),
    )
    assert done.returncode != 0
    assert b"oom" in done.stderr, done.stderr
    assert b"unreachable" not in done.stderr


GVISOR = pytest.param(
    "gvisor", id="gvisor", marks=needs_backend("gvisor", lambda: check_gvisor(GVisorConfig()))
)


@pytest.mark.parametrize("name", [GVISOR])
def test_a_run_gvisor_fails_for_lack_of_memory_says_so(name: str) -> None:
    """With room for the Sentry, the OOM killer picks the stub process that holds the
    hog's memory: the run only exits 1, and the sandbox's cgroup tells why."""
    done = forgehand(
        *("sandbox", "run", "--backend", name, "--memory", "1G", "--"),
        *("python3", "-c", "x = []\nwhile True: x.append(bytearray(50 << 20))"),
    )
    assert done.returncode == 1
    assert b"out-of-memory killer struck" in done.stderr, done.stderr


def test_stronger_isolation_than_available_fails_closed() -> None:
    done = forgehand("sandbox", "run", "--backend", "bwrap", "--isolation", "kernel", "--", "true")
    assert done.returncode != 0
    assert b"isolation" in done.stderr


def test_ls_gc_and_doctor() -> None:
    assert b"backend bwrap" not in forgehand("sandbox", "ls").stderr
    gc = forgehand("sandbox", "gc")
    # Other backends' leftovers may fail to go; bwrap's own cleanup must not.
    assert b"leftover sandbox(es) removed" in gc.stdout
    assert b"backend bwrap" not in gc.stderr
    doctor = forgehand("doctor")
    assert doctor.returncode == 0
    assert b"bwrap    available" in doctor.stdout


@pytest.mark.slow
def test_bench_sandbox_prints_one_json_object() -> None:
    done = forgehand(
        "bench",
        "sandbox",
        "--json",
        "--runs",
        "2",
        "--density-max",
        "2",
        "--backend",
        "bwrap",
        timeout=600,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    result = json.loads(done.stdout)
    assert set(result) == {"host_spawn_ms", "backends", "density"}
    assert set(result["host_spawn_ms"]) == {"p50", "p99"}
    bwrap = result["backends"]["bwrap"]
    assert set(bwrap) == {
        "start_ms",
        "cold_start_ms",
        "idle_pss_mb",
        "idle_pss_alone_mb",
    }
    assert set(bwrap["start_ms"]) == set(bwrap["cold_start_ms"]) == {"p50", "p99"}
    assert bwrap["idle_pss_mb"] > 0
    assert bwrap["idle_pss_alone_mb"] > 0
    assert set(result["density"]) == {"backend", "started", "seconds", "total_pss_mb"}
    assert 1 <= result["density"]["started"] <= 2
