"""podman's mount count of an image is shared: a sandbox start gives back exactly the
count it raised, whoever else mounts the image (``sandbox.images``).

An operator (here: the test) holds a ``podman image mount`` of the image. Whatever way a
start ends, cancelled or not, the operator's mount must still be there afterwards, and
once the operator unmounts, nothing of the start's may keep the image mounted."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sandbox_support import tiny_root_archive

from forgehand.sandbox import images, readonly_views, rootfs

pytestmark = pytest.mark.needs_root

IMAGE = "localhost/forgehand-test-mount-count:1"
SIBLING = "localhost/forgehand-test-mount-count-sibling:1"
"""Another image on the same top layer (only its config differs): one mount count."""


def podman(*arguments: str) -> str:
    done = subprocess.run(["podman", *arguments], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def image_id(name: str) -> str:
    return podman("image", "inspect", "--format", "{{.Id}}", name)


def mounted(name: str) -> bool:
    return image_id(name) in podman("image", "mount", "--format", "json")


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """``IMAGE`` and ``SIBLING``, imported from one archive (nothing is pulled)."""
    archive = tiny_root_archive()
    for name, change in ((IMAGE, "LABEL role=image"), (SIBLING, "LABEL role=sibling")):
        subprocess.run(
            ["podman", "import", "--change", change, "-", name],
            input=archive,
            capture_output=True,
            check=True,
        )
    try:
        yield IMAGE
    finally:
        for name in (IMAGE, SIBLING):
            subprocess.run(["podman", "image", "unmount", "--force", name], capture_output=True)
            subprocess.run(["podman", "rmi", "--force", name], capture_output=True)


@pytest.fixture
def operator(image: str) -> Iterator[str]:
    """The operator's own mount of the image, held for the test; afterwards the operator
    unmounts once, and then the image must not be mounted by anyone."""
    podman("image", "mount", image)
    try:
        yield image
    finally:
        podman("image", "unmount", image)
        assert not mounted(image), "a start left podman's mount count raised"


@pytest.fixture
def directory() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fh-imount-", dir="/tmp"))
    yield path
    rootfs.release_image(path)
    shutil.rmtree(path, ignore_errors=True)


Podman = Callable[..., Awaitable[str]]


def on_mount(
    monkeypatch: pytest.MonkeyPatch, step: Callable[[Podman, tuple[Any, ...]], Any]
) -> None:
    """Route ``podman image mount <id>`` through ``step(real, arguments)``."""
    real: Podman = images._podman

    async def podman_(binary: str, *arguments: str) -> str:
        if arguments[:2] == ("image", "mount") and "--format" not in arguments:
            result: str = await step(real, (binary, *arguments))
            return result
        return await real(binary, *arguments)

    monkeypatch.setattr(images, "_podman", podman_)


async def test_the_root_is_the_image_that_was_mounted(image: str, directory: Path) -> None:
    path, mounted_image = await images.mount(directory, image)
    assert mounted_image.id == image_id(image)
    assert str(mounted_image) == f"image {image} (sha256:{image_id(image)[:12]})"
    assert (path / "etc" / "os-release").read_text().startswith("ID=tiny")
    assert readonly_views.is_read_only(path)
    assert not mounted(image)  # podman's own mount given back, the bind holds it


async def test_an_operators_mount_survives_a_start_cut_off_before_podman_mounted(
    operator: str, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: cancelled before podman mounted, a start must not give back a count it
    never raised, which would unmount the operator's image."""

    async def cut_off_before(real: Podman, arguments: tuple[Any, ...]) -> str:
        raise asyncio.CancelledError

    on_mount(monkeypatch, cut_off_before)
    with pytest.raises(asyncio.CancelledError):
        await images.mount(directory, operator)
    assert mounted(operator)


async def test_a_start_cancelled_while_podman_mounts_gives_back_exactly_its_count(
    operator: str, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = asyncio.Event()

    async def signal_then_mount(real: Podman, arguments: tuple[Any, ...]) -> str:
        started.set()
        return await real(*arguments)

    on_mount(monkeypatch, signal_then_mount)
    start = asyncio.ensure_future(images.mount(directory, operator))
    await started.wait()
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    assert mounted(operator)  # and the operator's unmount (the fixture) unmounts it


async def test_a_start_cut_off_after_podman_mounted_gives_its_count_back(
    image: str, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """podman mounted, but its answer was lost: the image was unmounted before and is
    mounted now, so the count is this start's."""

    async def answer_lost(real: Podman, arguments: tuple[Any, ...]) -> str:
        await real(*arguments)
        raise asyncio.CancelledError

    on_mount(monkeypatch, answer_lost)
    with pytest.raises(asyncio.CancelledError):
        await images.mount(directory, image)
    assert not mounted(image)


async def test_images_on_one_layer_mount_one_at_a_time(image: str, directory: Path) -> None:
    """The sibling shares the image's top layer, hence its mount count and its lock: while
    the lock is held elsewhere, a start of the sibling waits and leaves podman alone."""
    binary = images.find_podman()
    first, second = [await images._inspect(binary, name) for name in (image, SIBLING)]
    assert first.id != second.id
    assert first.lock_file == second.lock_file
    first.lock_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    holder = os.open(first.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    start = asyncio.ensure_future(images.mount(directory, SIBLING))
    try:
        await waiting_on(first.lock_file)
        assert not mounted(SIBLING)
    finally:
        os.close(holder)
        path, _ = await start
    assert (path / "etc" / "os-release").exists()
    assert not mounted(SIBLING)


async def waiting_on(lock_file: Path) -> None:
    """Return once someone waits for the flock on ``lock_file`` (``/proc/locks``)."""
    inode = f":{os.stat(lock_file).st_ino} "
    for _ in range(3000):
        locks = Path("/proc/locks").read_text().splitlines()
        if any("->" in line and "FLOCK" in line and inode in line for line in locks):
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"nobody waited for {lock_file}")
