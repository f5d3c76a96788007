"""``root: dir`` and ``root: image`` on every backend: the sandbox sees the given root's
programs and files, never the host's /usr, while the runner brings its own userland
(``sandbox.layout``); an image comes from podman's local store (``sandbox.images``).

The root is built here from a few host programs and their libraries, laid out the way an
older distribution is (real /bin, /lib, /lib64, no merged /usr) and with no Python at all,
so the runner cannot be leaning on it. The image is that root, imported into podman."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sandbox_support import backend_params, build_tiny_root
from sandbox_support import tiny_image as import_tiny_image

from forgehand.runner.model import RunSpec
from forgehand.sandbox import images, rootfs
from forgehand.sandbox.backend import Sandbox, SandboxBackend
from forgehand.sandbox.bwrap_backend import BwrapBackend, BwrapBackendConfig
from forgehand.sandbox.errors import SandboxLaunchError
from forgehand.sandbox.gvisor import GVisorBackend, GVisorConfig
from forgehand.sandbox.layout import custom_root, elf_interpreter, runner_userland
from forgehand.sandbox.podman import PodmanBackend, PodmanConfig
from forgehand.sandbox.runs import run_spec
from forgehand.sandbox.spec import SandboxSpec

Make = Callable[[Path], SandboxBackend]
BACKENDS = backend_params(
    [
        ("bwrap", lambda state: BwrapBackend(BwrapBackendConfig(state_dir=state))),
        ("gvisor", lambda state: GVisorBackend(GVisorConfig(state_dir=state))),
        ("podman", lambda state: PodmanBackend(PodmanConfig(state_dir=state))),
    ]
)
ISOLATION = {"bwrap": "process", "gvisor": "kernel", "podman": "container"}


@pytest.fixture(scope="module")
def tiny_root() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="fh-root-", dir="/tmp"))
    base.chmod(0o755)
    build_tiny_root(base / "root")
    yield base / "root"
    shutil.rmtree(base, ignore_errors=True)


IMAGE = "localhost/forgehand-test-tiny-root:1"


@pytest.fixture(scope="module")
def tiny_image() -> Iterator[str]:
    with import_tiny_image(IMAGE) as name:
        yield name


@pytest.fixture(params=["dir", "image"])
def root(request: pytest.FixtureRequest, tiny_root: Path) -> dict[str, str]:
    """The tiny root as ``root: dir``, or as ``root: image``."""
    if request.param == "dir":
        return {"type": "dir", "path": str(tiny_root)}
    return {"type": "image", "name": request.getfixturevalue("tiny_image")}


def podman_mounted_images() -> str:
    """What podman has mounted (``podman image mount`` without a name lists it)."""
    listing = subprocess.run(["podman", "image", "mount"], capture_output=True, text=True)
    return listing.stdout


def podman_containers() -> list[str]:
    listing = subprocess.run(
        ["podman", "ps", "--all", "--format", "{{.Names}}"], capture_output=True, text=True
    )
    return listing.stdout.split()


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fh-croot-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_spec(base: Path, root: Path | dict[str, str], name: str, **fields: Any) -> SandboxSpec:
    given = root if isinstance(root, dict) else {"type": "dir", "path": str(root)}
    return SandboxSpec.model_validate(
        {
            "work_dir": {"host_path": str(base / "work")},
            "root": given,
            "isolation": ISOLATION[name],
            "limits": {"memory_bytes": "512M", "wall_time_seconds": 120},
            **fields,
        }
    )


@pytest.fixture(params=BACKENDS)
async def sandbox(
    request: pytest.FixtureRequest, base: Path, root: dict[str, str]
) -> AsyncIterator[tuple[Sandbox, SandboxSpec]]:
    backend: SandboxBackend = request.param(base / "state")
    name = backend_name(backend)
    spec = make_spec(base, root, name)
    async with backend.create(spec) as box:
        yield box, spec
    leftovers = Path("/proc/self/mounts").read_text().splitlines()
    assert not [m for m in leftovers if f" {base}/" in m], "a mount outlived the sandbox"
    if root["type"] == "image":
        assert root["name"] not in podman_mounted_images()
        assert not [c for c in podman_containers() if c.startswith("forgehand-image-")]


def backend_name(backend: SandboxBackend) -> str:
    return {"BwrapBackend": "bwrap", "GVisorBackend": "gvisor", "PodmanBackend": "podman"}[
        type(backend).__name__
    ]


async def sh(box: tuple[Sandbox, SandboxSpec], script: str) -> tuple[int, str, str]:
    sandbox, spec = box
    result = await sandbox.client.run(run_spec(spec, ["/bin/sh", "-c", script]))
    return result.exit.code, result.stdout.decode(), result.stderr.decode()


async def test_runs_see_the_root_and_not_the_host(sandbox: tuple[Sandbox, SandboxSpec]) -> None:
    code, out, err = await sh(
        sandbox,
        "cat /etc/os-release; cat /opt/tool/VERSION; ls /opt; ls /bin; "
        "test -e /usr/bin/python3 && echo HOST-PYTHON; test -e /etc/a-fifo && echo FIFO; :",
    )
    assert code == 0, err
    assert "ID=tiny" in out
    assert "tool 1.0" in out
    assert "HOST-PYTHON" not in out
    assert "FIFO" not in out
    assert "dash" in out.split()
    assert "python3" not in out


async def test_achieved_names_the_root_exactly(
    sandbox: tuple[Sandbox, SandboxSpec], root: dict[str, str]
) -> None:
    """The root as given for a directory; for an image, also the ID of the one mounted."""
    box, _ = sandbox
    if root["type"] == "dir":
        assert box.achieved.root == f"dir {root['path']}"
        return
    listing = ["podman", "image", "inspect", "--format", "{{.Id}}", root["name"]]
    image_id = subprocess.run(listing, capture_output=True, text=True, check=True).stdout
    assert box.achieved.root == f"image {root['name']} (sha256:{image_id[:12]})"


async def test_the_sandbox_keeps_its_own_accounts_and_mounts(
    sandbox: tuple[Sandbox, SandboxSpec],
) -> None:
    code, out, err = await sh(
        sandbox, "id -un; cat /etc/passwd; ls /opt/forgehand; ls -l /etc/mtab; pwd"
    )
    assert code == 0, err
    assert "intruder" not in out  # the generated accounts, not the root's
    assert out.splitlines()[0] == "sandbox"
    assert "decoy" not in out  # /opt/forgehand is the runner's
    assert "/proc/self/mounts" in out  # still a symlink, resolved inside the sandbox
    assert out.strip().endswith("/work")


async def test_the_root_is_read_only_and_the_work_dir_writable(
    sandbox: tuple[Sandbox, SandboxSpec],
) -> None:
    code, out, _ = await sh(
        sandbox, "touch /bin/new 2>/dev/null && echo ROOT-WRITABLE; touch made && ls"
    )
    assert code == 0
    assert "ROOT-WRITABLE" not in out
    assert "made" in out


async def test_a_setuid_program_of_the_root_gains_nothing(
    sandbox: tuple[Sandbox, SandboxSpec],
) -> None:
    code, out, err = await sh(sandbox, "ls -l /bin/suid-id; suid-id -u; suid-id -ru")
    assert code == 0, err
    assert out.split()[0].startswith("-rws")  # the bit is there
    assert out.split()[-2:] == ["1000", "1000"]  # and gives nothing


async def test_a_typed_step_runs_on_the_runners_own_python(
    sandbox: tuple[Sandbox, SandboxSpec],
) -> None:
    """The step engine is Python; the root has none, so it runs on the runner's userland."""
    box, spec = sandbox
    step = RunSpec(
        step="builtin://run",
        step_inputs={"command": "cat /etc/os-release"},
        cwd=str(spec.work_dir.sandbox_path),
    )
    result = await box.client.run(step)
    assert result.step_result is not None, result.stderr
    assert result.step_result["status"] == "succeeded", result.step_result


@pytest.mark.parametrize("make", BACKENDS)
async def test_the_egress_forwarder_starts_in_a_custom_root(
    make: Make, base: Path, tiny_root: Path
) -> None:
    name = backend_name(make(base / "state"))
    spec = make_spec(base, tiny_root, name, network={"mode": "proxy", "allow_hosts": ["pypi.org"]})
    async with make(base / "state").create(spec) as box:
        result = await box.client.run(run_spec(spec, ["/bin/sh", "-c", "echo $HTTPS_PROXY"]))
    assert result.stdout.decode().startswith("http://127.0.0.1:3128")


@pytest.mark.parametrize("make", BACKENDS)
async def test_a_work_dir_the_root_cannot_hold_is_refused_before_anything_starts(
    make: Make, base: Path, tiny_root: Path
) -> None:
    name = backend_name(make(base / "state"))
    spec = make_spec(base, tiny_root, name)
    spec = spec.model_copy(
        update={"work_dir": spec.work_dir.model_copy(update={"sandbox_path": Path("/opt/tool/w")})}
    )
    with pytest.raises(SandboxLaunchError, match="/opt/tool/w lies in the root's /opt/tool"):
        async with make(base / "state").create(spec):
            pass


def test_the_layout_lists_entries_as_the_sandbox_shows_them(tiny_root: Path) -> None:
    spec = SandboxSpec.model_validate(
        {"work_dir": {"host_path": "/tmp/w"}, "root": {"type": "dir", "path": str(tiny_root)}}
    )
    layout = custom_root(spec)
    assert layout is not None
    targets = {str(b.target) for b in layout.binds}
    assert {"/bin", "/lib", "/lib64", "/opt/tool"} <= targets
    assert "/work" not in targets  # the work dir covers it
    assert not any(t.startswith(("/etc", "/proc", "/opt/forgehand")) for t in targets)
    etc = {str(getattr(e, "target", getattr(e, "path", ""))) for e in layout.etc}
    assert "/etc/os-release" in etc
    assert "/etc/mtab" in etc
    assert "/etc/passwd" not in etc
    assert "/etc/a-fifo" not in etc


def test_the_runner_userland_is_the_hosts_interpreter_through_its_own_loader() -> None:
    import sys

    venv = Path(sys.prefix)
    userland = runner_userland(venv, Path(__file__).parents[2] / "src")
    loader = elf_interpreter(Path(sys.executable).resolve())
    assert str(userland.loader).startswith("/opt/forgehand/host/")
    assert str(userland.loader).endswith(Path(loader).name)
    argv = userland.python_m()
    assert argv[:2] == [str(userland.loader), "--inhibit-cache"]
    assert "-I" in argv
    assert "-S" in argv


@pytest.mark.parametrize("make", BACKENDS)
async def test_an_image_not_in_the_local_store_is_refused_and_never_pulled(
    make: Make, base: Path
) -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    backend = make(base / "state")
    root = {"type": "image", "name": "localhost/forgehand-test-no-such-image:1"}
    spec = make_spec(base, root, backend_name(backend))
    with pytest.raises(SandboxLaunchError, match="never pulls"):
        async with backend.create(spec):
            pass
    assert await backend.list_sandboxes() == []


CRASHING_OWNER = """
import asyncio, os, sys
from pathlib import Path
from forgehand.sandbox.bwrap_backend import BwrapBackend, BwrapBackendConfig
from forgehand.sandbox.spec import SandboxSpec

async def main():
    spec = SandboxSpec.model_validate(
        {"work_dir": {"host_path": sys.argv[1]}, "root": {"type": "image", "name": sys.argv[3]}}
    )
    backend = BwrapBackend(BwrapBackendConfig(state_dir=Path(sys.argv[2])))
    await backend.create(spec).__aenter__()
    os._exit(0)  # the owner is gone: the sandbox and its image bind are leftovers

asyncio.run(main())
"""


async def test_gc_detaches_the_image_a_crashed_owner_left(base: Path, tiny_image: str) -> None:
    state = base / "state"
    owner = [sys.executable, "-c", CRASHING_OWNER, str(base / "work"), str(state), tiny_image]
    subprocess.run(owner, check=True, timeout=120)
    backend = BwrapBackend(BwrapBackendConfig(state_dir=state))
    (leftover,) = await backend.list_sandboxes()
    directory = backend.registry.directory(leftover.sandbox_id)
    bound, hold = directory / "image", images.hold_name(directory)
    assert f" {bound} " in Path("/proc/self/mounts").read_text()
    assert hold in podman_containers()
    await backend.reap()
    assert f" {bound} " not in Path("/proc/self/mounts").read_text()
    assert hold not in podman_containers()  # the image is free to remove again
    assert await backend.list_sandboxes() == []


def test_a_root_whose_etc_or_opt_leads_out_of_it_brings_nothing_of_the_host(
    base: Path, tiny_root: Path
) -> None:
    """An image with ``etc -> /etc`` (or ``opt -> /root``) names host paths: followed on the
    host, it would bind the host's own files into the sandbox."""
    host_secrets = base / "host-secrets"
    host_secrets.mkdir()
    (host_secrets / "shadow").write_text("root:$6$secret\n")
    root = base / "evil-root"
    shutil.copytree(tiny_root, root, symlinks=True, ignore=shutil.ignore_patterns("a-fifo"))
    shutil.rmtree(root / "etc")
    shutil.rmtree(root / "opt")
    (root / "etc").symlink_to(host_secrets)
    (root / "opt").symlink_to(host_secrets)
    (root / "odd:name,ro").mkdir()
    spec = make_spec(base, root, "bwrap")
    layout = custom_root(spec)
    assert layout is not None
    assert layout.etc == ()
    shown = [str(e.target) for e in layout.binds] + [str(e.path) for e in layout.links]
    assert not any(t.startswith(("/etc", "/opt")) for t in shown)
    assert "/odd:name,ro" not in shown


@pytest.mark.parametrize("make", BACKENDS)
async def test_a_root_whose_etc_leads_out_of_it_shows_only_generated_files(
    make: Make, base: Path, tiny_root: Path
) -> None:
    host_secrets = base / "host-secrets"
    host_secrets.mkdir(mode=0o755)
    (host_secrets / "shadow").write_text("root:$6$secret\n")
    (host_secrets / "shadow").chmod(0o644)
    root = base / "evil-root"
    shutil.copytree(tiny_root, root, symlinks=True, ignore=shutil.ignore_patterns("a-fifo"))
    shutil.rmtree(root / "etc")
    (root / "etc").symlink_to(host_secrets)
    backend = make(base / "state")
    spec = make_spec(base, root, backend_name(backend))
    async with backend.create(spec) as box:
        result = await box.client.run(run_spec(spec, ["/bin/ls", "/etc"]))
    assert result.exit.code == 0, result.stderr
    shown = set(result.stdout.decode().split())
    assert "shadow" not in shown
    assert {"passwd", "group", "hosts"} <= shown  # the generated ones


MARKER_LIBRARY = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
__attribute__((constructor)) static void mark(void) {  /* a file per process that loads it */
    char comm[32] = {0}, path[96];
    int fd = open("/proc/self/comm", O_RDONLY);
    if (fd >= 0) { read(fd, comm, sizeof comm - 1); close(fd); }
    comm[strcspn(comm, "\n")] = 0;
    snprintf(path, sizeof path, "/work/loaded-by-%s-%d", comm, (int)getpid());
    close(open(path, O_WRONLY | O_CREAT, 0644));
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the library")
@pytest.mark.parametrize("make", BACKENDS)
async def test_the_roots_ld_so_preload_loads_nothing_into_the_runner(
    make: Make, base: Path, tiny_root: Path
) -> None:
    """Every dynamic loader reads /etc/ld.so.preload, the runner's too: the root's would
    run its code inside the runner (it did, before the file was left out)."""
    root = base / "preloading-root"
    shutil.copytree(tiny_root, root, symlinks=True, ignore=shutil.ignore_patterns("a-fifo"))
    source = base / "marker.c"
    source.write_text(MARKER_LIBRARY)
    library = root / "lib" / "marker.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    library.chmod(0o755)
    (root / "etc" / "ld.so.preload").write_text("/lib/marker.so\n")
    backend = make(base / "state")
    spec = make_spec(base, root, backend_name(backend))
    async with backend.create(spec) as box:
        result = await box.client.run(run_spec(spec, ["/bin/ls", "/etc"]))
        step = await box.client.run(
            RunSpec(step="builtin://read_file", step_inputs={"path": "x"}, step_work_dir="/work")
        )
        loaded = sorted(p.name for p in box.work_dir.glob("loaded-by-*"))  # gone after
    assert loaded == []
    assert step.step_result is not None  # the step engine ran, on the runner's loader
    assert result.exit.code == 0, result.stderr
    assert "ld.so.preload" not in result.stdout.decode().split()


def test_an_oci_sandbox_refuses_to_copy_a_huge_etc(base: Path, tiny_root: Path) -> None:
    """gVisor and podman copy the root's /etc per sandbox: one stuffed with data (a sparse
    file here) must not fill the host's disk, sandbox after sandbox."""
    root = base / "fat-root"
    shutil.copytree(tiny_root, root, symlinks=True, ignore=shutil.ignore_patterns("a-fifo"))
    with (root / "etc" / "blob").open("wb") as blob:
        blob.truncate(rootfs.ROOT_ETC_MAX_BYTES + 1)
    spec = make_spec(base, root, "podman")
    layout = rootfs.SandboxRoot.for_spec(spec)
    with pytest.raises(SandboxLaunchError, match="trim it"):
        rootfs.prepare_rootfs(base / "made", spec, [], layout)


GVISOR_EXEC = [
    p
    for p in BACKENDS
    if p.id == "gvisor"  # the exec channel: each connection is `runsc exec … proxy`
]


@pytest.mark.parametrize("make", GVISOR_EXEC)
async def test_gvisors_exec_channel_runs_its_proxy_on_the_runners_userland(
    make: Make, base: Path, tiny_root: Path
) -> None:
    backend = GVisorBackend(GVisorConfig(state_dir=base / "state", runner_channel="exec"))
    spec = make_spec(base, tiny_root, "gvisor")
    async with backend.create(spec) as box:
        result = await box.client.run(run_spec(spec, ["/bin/cat", "/etc/os-release"]))
    assert "ID=tiny" in result.stdout.decode(), result.stderr
