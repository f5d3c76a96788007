"""An image root is held by a container of the sandbox's own (``sandbox.images``).

podman removes a mounted image without a word, and an image's mount count is shared by
everyone who mounts it. So a sandbox holds its image with a never-started container:
podman refuses to remove the image while it exists, and the container's mount is the
sandbox's alone. Whatever step a start is cut at, ``release`` leaves nothing behind, and
an operator's own mount of the image is never touched."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sandbox_support import tiny_root_archive

from forgehand.runner.model import RunSpec
from forgehand.sandbox import images, readonly_views
from forgehand.sandbox.bwrap_backend import BwrapBackend, BwrapBackendConfig
from forgehand.sandbox.spec import SandboxSpec

pytestmark = pytest.mark.needs_root

IMAGE = "localhost/forgehand-test-image-hold:1"


def podman(*arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *arguments], capture_output=True, text=True, check=check)


def image_id(name: str) -> str:
    return podman("image", "inspect", "--format", "{{.Id}}", name).stdout.strip()


def mounted(name: str) -> bool:
    return image_id(name) in podman("image", "mount", "--format", "json").stdout


def holds() -> list[str]:
    """The hold containers on this machine (``podman ps --all`` by their label)."""
    listing = podman(
        "ps", "--all", "--filter", f"label={images.HOLD_LABEL}", "--format", "{{.Names}}"
    )
    return listing.stdout.split()


@pytest.fixture
def image() -> Iterator[str]:
    """``IMAGE``, imported for the test (nothing is pulled); afterwards it must be
    removable without force: nothing may hold it any more."""
    archive = tiny_root_archive()
    subprocess.run(["podman", "import", "-", IMAGE], input=archive, capture_output=True, check=True)
    try:
        yield IMAGE
    finally:
        removed = podman("rmi", IMAGE, check=False)
        podman("rmi", "--force", IMAGE, check=False)
        assert removed.returncode == 0, f"the image was still held: {removed.stderr}"


@pytest.fixture
def directory() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fh-ihold-", dir="/tmp"))
    yield path
    images.release(path)
    shutil.rmtree(path, ignore_errors=True)
    assert images.hold_name(path) not in holds()


Podman = Callable[..., Awaitable[str]]


def cut_after(monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """Let ``podman <command> …`` run, then cut the start off as a cancel would."""
    real: Podman = images._podman

    async def podman_(binary: str, *arguments: str) -> str:
        result: str = await real(binary, *arguments)
        if arguments[0] == command:
            raise asyncio.CancelledError
        return result

    monkeypatch.setattr(images, "_podman", podman_)


async def test_the_root_is_the_image_resolved_once_and_held(image: str, directory: Path) -> None:
    path, held = await images.mount(directory, image)
    assert held.id == image_id(image)
    assert str(held) == f"image {image} (sha256:{image_id(image)[:12]})"
    assert (path / "etc" / "os-release").read_text().startswith("ID=tiny")
    assert readonly_views.is_read_only(path)
    assert images.hold_name(directory) in holds()
    assert not mounted(image)  # the image's own mount count is nobody's business here
    images.release(directory)
    assert images.hold_name(directory) not in holds()
    assert not (path / "etc").exists()


@pytest.mark.parametrize("command", ["create", "mount"])
async def test_a_start_cut_off_at_any_podman_step_leaves_nothing(
    image: str, directory: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    cut_after(monkeypatch, command)
    with pytest.raises(asyncio.CancelledError):
        await images.mount(directory, image)
    assert images.hold_name(directory) in holds()  # made, and recorded before it was
    images.release(directory)
    assert images.hold_name(directory) not in holds()  # the image fixture removes it


async def test_a_cancel_lets_podman_finish_what_it_started(image: str, directory: Path) -> None:
    """podman killed halfway through making a container may leave storage that
    ``podman rm`` does not know: a cancel waits for the command, then ends the start."""
    start = asyncio.ensure_future(images.mount(directory, image))
    while not (directory / images.HOLD_FILE).exists():
        await asyncio.sleep(0.005)
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    images.release(directory)
    assert images.hold_name(directory) not in holds()


async def test_an_operators_mount_of_the_image_is_never_touched(
    image: str, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    podman("image", "mount", image)
    try:
        await images.mount(directory, image)
        images.release(directory)
        cut_after(monkeypatch, "create")
        with pytest.raises(asyncio.CancelledError):
            await images.mount(directory, image)
        images.release(directory)
        assert mounted(image)
    finally:
        podman("image", "unmount", image)
    assert not mounted(image)


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
async def test_an_image_in_use_cannot_be_removed_under_its_sandbox(image: str) -> None:
    """It could: podman removed the image of a running sandbox, whose every later command
    then failed with "No such file or directory"."""
    base = Path(tempfile.mkdtemp(prefix="fh-ihold-", dir="/tmp"))
    base.chmod(0o711)
    spec = SandboxSpec.model_validate(
        {"work_dir": {"host_path": str(base / "work")}, "root": {"type": "image", "name": image}}
    )
    try:
        async with BwrapBackend(BwrapBackendConfig(state_dir=base / "state")).create(spec) as box:
            refused = podman("rmi", image, check=False)
            result = await box.client.run(RunSpec(argv=("/bin/ls", "/bin"), cwd="/work"))
        assert refused.returncode != 0
        assert "in use by a container" in refused.stderr
        assert result.exit.code == 0, result.stderr
        assert "cat" in result.stdout.decode().split()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    # The image fixture then removes the image without force: nothing holds it any more.


async def test_an_images_volumes_make_no_podman_volumes(directory: Path) -> None:
    """``podman create`` makes an anonymous volume for each VOLUME of an image, which
    outlives ``podman rm``: one leaked per sandbox start, until the hold ignored them."""
    name = "localhost/forgehand-test-image-volume:1"
    archive = tiny_root_archive()
    argv = ["podman", "import", "--change", "VOLUME /data", "-", name]
    subprocess.run(argv, input=archive, capture_output=True, check=True)
    volumes = podman("volume", "ls", "--quiet").stdout.split()
    try:
        path, _ = await images.mount(directory, name)
        assert (path / "etc" / "os-release").exists()
        images.release(directory)
    finally:
        podman("rmi", "--force", name, check=False)
    assert podman("volume", "ls", "--quiet").stdout.split() == volumes


async def test_gc_removes_the_holds_whose_sandbox_directory_is_gone(
    image: str, directory: Path
) -> None:
    """A reboot empties /run, where the sandbox directories live, but not podman's store:
    its holds would keep their images from ever being removed."""
    gone = Path(tempfile.mkdtemp(prefix="fh-ihold-", dir="/tmp"))
    await images.mount(gone, image)
    await images.mount(directory, image)  # a live sandbox's hold: kept
    readonly_views.release_below(gone / images.IMAGE_DIR)
    shutil.rmtree(gone)
    done = subprocess.run(
        [sys.executable, "-m", "forgehand.cli.main", "sandbox", "gc"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"removed image hold {images.hold_name(gone)}" in done.stdout
    assert images.hold_name(gone) not in holds()
    assert images.hold_name(directory) in holds()
    assert images.remove_orphan_holds() == []


def test_release_of_a_sandbox_without_an_image_runs_no_podman(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_podman(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("podman was run for a sandbox that holds no image")

    monkeypatch.setattr(subprocess, "run", no_podman)
    images.release(directory)
