"""``forgehand sandbox run|ls|gc``, ``forgehand doctor`` and ``forgehand bench sandbox``
as a user runs them: real processes, real bwrap sandboxes (and gVisor and podman ones
where a limit breach must say why)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bwrap_support import NEEDS_BWRAP, scratch_dir
from sandbox_support import build_tiny_root, needs_backend

from forgehand.cli.main import build_parser
from forgehand.cli.sandbox import build_spec
from forgehand.sandbox.gvisor import GVisorConfig
from forgehand.sandbox.gvisor import check_host as check_gvisor
from forgehand.sandbox.podman import PodmanConfig
from forgehand.sandbox.podman import check_host as check_podman

pytestmark = NEEDS_BWRAP


def forgehand(
    *args: str, timeout: float = 120, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-m", "forgehand.cli.main", *args]
    return subprocess.run(
        argv, input=stdin, env=env, capture_output=True, timeout=timeout, check=False
    )


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
    """With room for the Sentry, the OOM killer usually picks the stub process that holds
    the hog's memory: the run only exits 1, and the sandbox's cgroup tells why. The
    kernel's pick is its own, though: when it takes the Sentry, the whole sandbox ends,
    and that must be said too."""
    done = forgehand(
        *("sandbox", "run", "--backend", name, "--memory", "1G", "--"),
        *("python3", "-c", "x = []\nwhile True: x.append(bytearray(50 << 20))"),
    )
    if b"the sandbox ended: oom:" in done.stderr:  # the Sentry was picked
        assert done.returncode != 0
        return
    assert done.returncode == 1, done.stderr
    assert b"out-of-memory killer struck" in done.stderr, done.stderr


RUN = ("sandbox", "run", "--backend", "bwrap")


def test_options_map_onto_the_spec(tmp_path: Path) -> None:
    argv = [*RUN, "--cpus", "0.5", "--output-limit", "1K", "--env", "A=1=2"]
    argv += ["--mount", f"{tmp_path}:/data", "--mount", str(tmp_path)]
    argv += ["--network", "proxy", "--allow-host", "pypi.org", "--read-only-network"]
    spec = build_spec(build_parser().parse_args([*argv, "--", "true"]), Path("/run/w"))
    assert (spec.limits.cpu_cores, spec.limits.output_bytes) == (0.5, 1024)
    assert spec.env == {"A": "1=2"}
    assert [m.destination for m in spec.ro_mounts] == [Path("/data"), tmp_path]
    assert spec.network.model_dump(include={"read_only_methods"}) == {"read_only_methods": True}
    default = build_spec(build_parser().parse_args([*RUN, "--", "true"]), Path("/run/w"))
    assert (default.limits.cpu_cores, default.limits.output_bytes) == (1.0, 10 << 20)


def test_env_passes_what_is_named_and_nothing_else() -> None:
    env = os.environ | {"FH_TEST_NAMED": "from-the-host", "FH_TEST_UNNAMED": "must-not-leak"}
    done = forgehand(*(*RUN, "--env", "GIVEN=a=b", "--env", "FH_TEST_NAMED", "--", "env"), env=env)
    assert done.returncode == 0, done.stderr
    seen = dict(line.split("=", 1) for line in done.stdout.decode().splitlines())
    assert seen["GIVEN"] == "a=b"
    assert seen["FH_TEST_NAMED"] == "from-the-host"
    assert "FH_TEST_UNNAMED" not in seen
    assert b"must-not-leak" not in done.stdout


@pytest.fixture
def shared() -> Iterator[Path]:
    """A host directory and file anyone may write: only the mount keeps a sandbox out."""
    for base in scratch_dir("fh-cli-"):
        (base / "shared").mkdir(mode=0o777)
        (base / "shared").chmod(0o777)
        (base / "shared" / "file").write_text("from the host\n")
        (base / "shared" / "file").chmod(0o666)
        yield base / "shared"


WRITE = """
for path in sys.argv[1:]:
    print(open(path).read().strip())
    for target, mode in ((path, "a"), (path + ".new", "w")):
        try:
            open(target, mode).write("x")
            print("written")
        except OSError as e:
            print(errno.errorcode[e.errno])
"""


def test_mount_is_visible_and_read_only(shared: Path) -> None:
    code = f"import errno, sys\n{WRITE}"
    done = forgehand(
        *(*RUN, "--mount", f"{shared}:/data", "--mount", str(shared), "--"),
        *("python3", "-c", code, "/data/file", f"{shared}/file"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["from", "the", "host", "EROFS", "EROFS"] * 2
    assert (shared / "file").read_text() == "from the host\n"
    assert sorted(p.name for p in shared.iterdir()) == ["file"]


def test_cpus_and_output_limit_are_applied() -> None:
    done = forgehand(
        *(*RUN, "--cpus", "0.5", "--output-limit", "1K", "--"),
        *("python3", "-c", "import sys; sys.stdout.write('x' * 5000)"),
    )
    assert done.stdout == b"x" * 1024
    assert done.returncode != 0
    assert b"output exceeded 1024 bytes" in done.stderr


def test_stdin_is_forwarded_only_when_asked() -> None:
    piped = forgehand(*RUN, "--stdin", "--", "cat", stdin=b"hi\n")
    assert (piped.returncode, piped.stdout) == (0, b"hi\n"), piped.stderr
    ignored = forgehand(*RUN, "--", "cat", stdin=b"hi\n")
    assert (ignored.returncode, ignored.stdout) == (0, b""), ignored.stderr


def test_stdin_left_open_does_not_keep_the_cli_running() -> None:
    argv = [sys.executable, "-m", "forgehand.cli.main", *RUN, "--stdin", "--", "true"]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE) as cli:
        try:
            assert cli.wait(timeout=120) == 0  # stdin is still open: the run alone decides
        finally:
            cli.kill()
            assert cli.stdin is not None
            cli.stdin.close()


PROXY_REQUESTS = """
import json, os, socket
out = {}
for line in ("GET http://127.0.0.1/ HTTP/1.1", "POST http://127.0.0.1/ HTTP/1.1",
             "CONNECT 127.0.0.1:443 HTTP/1.1"):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    s.sendall(f"{line}\\r\\nHost: 127.0.0.1\\r\\nContent-Length: 0\\r\\n\\r\\n".encode())
    out[line.split()[0]] = s.recv(200).split(b" ")[1].decode()
    s.close()
out["log"] = [json.loads(x) for x in open(os.environ["FORGEHAND_EGRESS_LOG"])]
print(json.dumps(out))
"""


def test_read_only_network_refuses_all_but_get() -> None:
    """127.0.0.1 is allowlisted, but the proxy never connects to loopback: nothing leaves
    the host, and GET is refused for that reason, not for its method."""
    done = forgehand(
        *(*RUN, "--network", "proxy", "--allow-host", "127.0.0.1", "--read-only-network"),
        *("--", "python3", "-c", PROXY_REQUESTS),
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["GET"], out["POST"], out["CONNECT"]) == ("403", "403", "403")
    reasons = {d["method"]: d["reason"] for d in out["log"]}
    assert "read-only" not in reasons["GET"]
    assert "loopback" in reasons["GET"]
    assert "read-only" in reasons["POST"]
    assert "read-only" in reasons["CONNECT"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--read-only-network",), b"--read-only-network needs --network proxy"),
        (("--env", "FH_TEST_SURELY_UNSET"), b"FH_TEST_SURELY_UNSET is not set"),
        (("--env", "BAD-NAME=1"), b"invalid sandbox options"),
        (("--mount", "/nonexistent/fh"), b"no such host path '/nonexistent/fh'"),
        (("--mount", "/usr:relative"), b"must be an absolute path"),
        (("--cpus", "0"), b"limits.cpu_cores"),
        (("--cpus", "inf"), b"not a number of cores"),
        (("--output-limit", "lots"), b"limits.output_bytes"),
        (("--rootfs", "/nonexistent/fh-root"), b"--rootfs /nonexistent/fh-root: no such"),
        (("--rootfs", "/", "--image", "debian:12"), b"--rootfs or --image, not both"),
        (("--rootfs", "/"), b"use root: host"),
        (("--image=-v",), b"root.image.name"),
    ],
)
def test_bad_run_options_are_usage_errors(options: tuple[str, ...], message: bytes) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FH_TEST_SURELY_UNSET"}
    done = forgehand(*RUN, *options, "--", "true", env=env)
    assert done.returncode == 2
    assert message in done.stderr, done.stderr


def test_rootfs_runs_the_command_on_that_roots_programs() -> None:
    for base in scratch_dir("fh-cli-root-"):
        build_tiny_root(base / "root")
        done = forgehand(*RUN, "--rootfs", str(base / "root"), "--", "sh", "-c", ROOT_PROBE)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.decode().splitlines()
        assert "ID=tiny" in lines
        assert lines[-1] == "no-python"


def test_an_image_that_is_not_here_is_never_pulled() -> None:
    done = forgehand(*RUN, "--image", "localhost/forgehand-test-absent:1", "--", "true")
    assert done.returncode != 0
    assert b"never pulls" in done.stderr, done.stderr


ROOT_PROBE = "cat /etc/os-release; test -e /usr/bin/python3 || echo no-python"


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
    if shutil.which("podman") is not None:
        assert b"images   available  root: image reads podman's local store (" in doctor.stdout


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
