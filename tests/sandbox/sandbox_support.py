"""What the tests that start real OCI sandboxes (gVisor, podman) share: when they can run,
a decoy socket that must never be connected to and the swap that tries it, one
process's PSS, and a tiny root filesystem (``build_tiny_root``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forgehand.runner.client import RunnerClient
from forgehand.runner.model import RunSpec

REPLACED = "replaced its runner's socket"
"""What the pinned connector's PermissionDenied says of a swapped socket."""


def needs_backend(name: str, check_host: Callable[[], object]) -> list[pytest.MarkDecorator]:
    """Marks for a module of real ``name`` sandboxes: root, slow, and skipped with the
    reason ``check_host`` raises when the backend cannot run here."""
    try:
        check_host()
        reason = ""
    except Exception as exc:
        reason = str(exc)
    return [
        pytest.mark.needs_root,
        pytest.mark.slow,
        pytest.mark.skipif(bool(reason), reason=f"{name} unavailable: {reason}"),
    ]


def backend_params(makers: Iterable[tuple[str, Callable[[Path], Any]]]) -> list[Any]:
    """One ``pytest.param(make, id=name)`` per ``(name, make)``: ``make(state_dir)`` gives
    a backend; the param is skipped with its ``availability()`` detail where it cannot run."""
    params = []
    for name, make in makers:
        status = make(Path("/nonexistent")).availability()
        marks = [pytest.mark.needs_root]
        marks.append(pytest.mark.skipif(not status.available, reason=f"{name}: {status.detail}"))
        params.append(pytest.param(make, id=name, marks=marks))
    return params


def decoy_socket(path: Path) -> Iterator[Path]:
    """A fixture body: a listening host socket at ``path`` that anyone may connect to; after
    the test it must have no connection waiting (nobody, host or sandbox, reached it)."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    os.chmod(path, 0o777)
    listener.listen()
    yield path
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()


def rollup_pss(pid: int) -> int:
    """One process's PSS in bytes, as ``/proc/<pid>/smaps_rollup`` shows it."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no Pss line for {pid}")


async def swap_for_symlink(client: RunnerClient, socket_path: object, decoy: Path) -> None:
    """Inside the sandbox, move ``socket_path`` aside and put a symlink to ``decoy`` there."""
    swap = f"mv {socket_path} {socket_path}.real && ln -s {decoy} {socket_path}"
    swapped = await client.run(RunSpec(argv=("sh", "-c", swap)))
    assert swapped.ok, swapped.stderr


PROGRAMS = ("/bin/dash", "/usr/bin/cat", "/usr/bin/ls", "/usr/bin/id", "/usr/bin/touch")


def build_tiny_root(root: Path) -> None:
    """A root with dash as /bin/sh, a few coreutils (one of them setuid root, ``suid-id``)
    and their libraries, an os-release,
    accounts of its own (which the sandbox must replace), a symlink to /proc in /etc (which
    must stay a symlink, never the host's file), an /opt tool and a decoy /opt/forgehand."""
    for directory in ("bin", "lib", "lib64", "etc", "opt/tool", "opt/forgehand", "work"):
        (root / directory).mkdir(parents=True)
    for program in PROGRAMS:
        shutil.copy2(program, root / "bin" / Path(program).name)
        for library in _libraries(program):
            target = root / ("lib64" if "ld-linux" in library.name else "lib") / library.name
            shutil.copy2(library, target)
    (root / "bin" / "sh").symlink_to("dash")
    (root / "etc" / "os-release").write_text('ID=tiny\nPRETTY_NAME="a tiny root"\n')
    (root / "etc" / "passwd").write_text("intruder:x:1000:1000::/:/bin/sh\n")
    (root / "etc" / "mtab").symlink_to("/proc/self/mounts")
    (root / "opt" / "tool" / "VERSION").write_text("tool 1.0\n")
    (root / "opt" / "forgehand" / "decoy").write_text("not the runner\n")
    os.mkfifo(root / "etc" / "a-fifo")  # special files are left out
    for path in (root, *root.rglob("*")):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
    shutil.copy2(root / "bin" / "id", root / "bin" / "suid-id")
    (root / "bin" / "suid-id").chmod(0o4755)  # setuid root, as an image may ship one


def _libraries(program: str) -> list[Path]:
    listing = subprocess.run(["ldd", program], capture_output=True, text=True, check=True)
    found = []
    for line in listing.stdout.splitlines():
        path = line.split("=>")[-1].split("(")[0].strip()
        if path.startswith("/"):
            found.append(Path(os.path.realpath(path)).with_name(Path(path).name))
    return found


def tiny_root_archive() -> bytes:
    """``build_tiny_root`` as a tar archive, for ``podman import``; the test is skipped
    where podman is not installed."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: root: image needs its local store")
    with tempfile.TemporaryDirectory(prefix="fh-image-", dir="/tmp") as scratch:
        build_tiny_root(Path(scratch) / "root")
        return subprocess.run(
            ["tar", "-C", f"{scratch}/root", "-c", "."], capture_output=True, check=True
        ).stdout


@contextlib.contextmanager
def tiny_image(name: str) -> Iterator[str]:
    """``build_tiny_root`` as the local podman image ``name`` (``podman import``: nothing
    is pulled), removed afterwards; the test is skipped where podman is not installed."""
    archive = tiny_root_archive()
    subprocess.run(["podman", "import", "-", name], input=archive, capture_output=True, check=True)
    try:
        yield name
    finally:
        subprocess.run(["podman", "rmi", "--force", name], capture_output=True, check=False)
