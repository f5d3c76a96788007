"""Local container images as sandbox roots (``root: image``), on every backend.

forgehand never pulls: the image must already be in this machine's (rootful) podman store,
put there by ``podman pull``, ``podman load`` or ``podman import``. At start, the image's
name is resolved to its ID once (``podman image inspect``); from there on everything names
the image by that ID, so a re-tag meanwhile cannot swap the image or make ``Achieved.root``
lie. podman mounts the image (``podman image mount``), the sandbox binds that mount
read-only, nosuid and nodev into its own directory (``<state>/<id>/image``), and podman's
mount is released at once: the bind keeps the image's file system alive for this sandbox
alone, whatever other sandboxes or podman do with the image meanwhile. From there on the
image is a ``root: dir`` (``forgehand.sandbox.layout``). Destroy and ``forgehand sandbox
gc`` detach the bind (``rootfs.release_image``).

podman counts the mounts of an image's top layer (images that share it share the count),
and anyone may raise or lower that count. So the mount, bind and unmount of one layer run
under an exclusive lock (``LOCK_DIR``) that every forgehand process takes, and the unmount
lowers the count only when this start raised it: podman said it mounted (a cancel lets
``podman image mount`` finish, so it always says), or, when podman's answer was lost, the
image was unmounted before and is mounted now. Another start's count, or one an operator
raised before this start, is never lowered; at worst a start whose answer was lost while
the image was mounted already leaves one count raised (the image stays mounted).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgehand.sandbox import readonly_views, rootfs
from forgehand.sandbox.errors import BackendUnavailable, SandboxLaunchError
from forgehand.sandbox.spec import DirRoot, ImageRoot, SandboxSpec

PODMAN_TIMEOUT_SECONDS = 120.0
LOCK_DIR = Path("/run/forgehand/image-mounts")
"""One lock file per image layer podman mounts, shared by every forgehand process on the
machine (not per backend state dir: podman's store is the machine's)."""
_IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ResolvedRoot:
    """A spec's root as a sandbox gets it."""

    spec: SandboxSpec
    """The spec, with a ``root: image`` replaced by the directory the image is bound at."""
    shown: str
    """The root as ``Achieved.root`` reports it: ``host``, ``dir /path`` or
    ``image NAME (sha256:<12 hex of its ID>)``."""


@dataclass(frozen=True)
class Image:
    """A local image as ``podman image inspect`` resolved it."""

    name: str
    id: str
    """The full image ID (64 hex): what is mounted and reported."""
    layer: str
    """What names the top layer, whose mount count podman keeps (the lock's key)."""

    @property
    def lock_file(self) -> Path:
        """The lock the mounts of this image's top layer run under."""
        return LOCK_DIR / f"{hashlib.sha256(self.layer.encode()).hexdigest()[:32]}.lock"

    def __str__(self) -> str:
        return f"image {self.name} (sha256:{self.id[:12]})"


async def as_dir_root(spec: SandboxSpec, directory: Path, podman: str = "podman") -> ResolvedRoot:
    """``spec`` with a ``root: image`` replaced by the directory the image is bound at
    (``directory/image``); any other spec as it is. ``directory`` must be recorded in the
    registry already: from the bind on, ``release`` (destroy, gc) owns it."""
    if isinstance(spec.root, ImageRoot):
        path, image = await mount(directory, spec.root.name, podman)
        return ResolvedRoot(spec.model_copy(update={"root": DirRoot(path=path)}), str(image))
    if isinstance(spec.root, DirRoot):
        return ResolvedRoot(spec, f"dir {spec.root.path}")
    return ResolvedRoot(spec, "host")


async def mount(directory: Path, name: str, podman: str = "podman") -> tuple[Path, Image]:
    """Bind the local image ``name`` read-only at ``directory/image``; that path and the
    image bound there."""
    binary = await asyncio.to_thread(find_podman, podman)  # missing: say so, unmount nothing
    image = await _inspect(binary, name)
    target = directory / rootfs.IMAGE_DIR
    lock = _LayerLock(image.lock_file)
    try:
        await rootfs.blocking(lock.acquire)  # a cancel waits for the lock, then lets go
        await _mount_and_bind(binary, image, target)
    finally:
        lock.release()
    return target, image


async def _mount_and_bind(binary: str, image: Image, target: Path) -> None:
    """Under the layer's lock: mount, bind, and give podman's mount back."""
    before = await _is_mounted(binary, image.id)
    # Not cancelled with its caller: how podman ends says whether it raised the count.
    mounting = asyncio.ensure_future(_podman(binary, "image", "mount", image.id))
    try:
        merged = Path(await asyncio.shield(mounting))
        if not merged.is_absolute():
            raise SandboxLaunchError(f"`podman image mount {image.name}` gave no path: {merged}")
        await rootfs.blocking(readonly_views.bind_read_only, merged, target)
    finally:
        # Our bind holds the image's file system now; podman's own mount is not needed.
        await rootfs.uncancellable(_give_back(binary, image.id, mounting, before=before))


async def _give_back(
    binary: str, image_id: str, mounting: asyncio.Future[str], *, before: bool
) -> None:
    """Lower the mount count if this start raised it: podman said it mounted, or, its
    answer lost, the image was unmounted before and is mounted now."""
    await asyncio.wait([mounting])
    raised = not mounting.cancelled() and mounting.exception() is None
    if not raised and not before:
        with contextlib.suppress(SandboxLaunchError, OSError):
            raised = await _is_mounted(binary, image_id)
    if raised:
        await _podman_quietly(binary, "image", "unmount", image_id)


async def _inspect(binary: str, name: str) -> Image:
    """``name`` resolved by podman: its ID and top layer."""
    text = await _podman(binary, "image", "inspect", name)
    try:
        found: Any = json.loads(text)[0]
        image_id, driver = found["Id"], found["GraphDriver"]
    except (ValueError, LookupError, TypeError) as exc:
        raise SandboxLaunchError(
            f"`podman image inspect {name}` gave no image: {text[:200]}"
        ) from exc
    if not isinstance(image_id, str) or not _IMAGE_ID.match(image_id):
        raise SandboxLaunchError(f"`podman image inspect {name}` gave an odd ID: {image_id!r}")
    # overlay names the top layer's dir; other drivers: one lock for every image.
    layer = (driver.get("Data") or {}).get("UpperDir") if isinstance(driver, dict) else None
    return Image(name, image_id, layer if isinstance(layer, str) and layer else "any-layer")


async def _is_mounted(binary: str, image_id: str) -> bool:
    """Whether podman has the image mounted (by anyone; images sharing its top layer
    show as mounted with it)."""
    text = await _podman(binary, "image", "mount", "--format", "json")
    try:
        listed: Any = json.loads(text) if text else []
    except ValueError as exc:
        raise SandboxLaunchError(f"`podman image mount` listed no JSON: {text[:200]}") from exc
    return any(isinstance(entry, dict) and entry.get("id") == image_id for entry in listed)


class _LayerLock:
    """An exclusive flock on a lock file. ``acquire`` blocks (run it in a thread) and
    keeps its descriptor here, so a caller cut off meanwhile can still ``release`` it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def acquire(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(self.path, flags, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # and with it the flock
            self.fd = -1


def find_podman(podman: str = "podman") -> str:
    """The podman binary, or BackendUnavailable saying what to install."""
    found = shutil.which(podman)
    if found is None:
        raise BackendUnavailable(
            "a root: image sandbox reads the image from podman's local store, and podman is "
            "not installed: apt-get install podman (or use root: dir with an unpacked image)"
        )
    return found


def availability(podman: str = "podman") -> tuple[bool, str]:
    """Whether ``root: image`` works here, and what it has to offer (for ``doctor``)."""
    try:
        binary = find_podman(podman)
    except BackendUnavailable as exc:
        return False, str(exc)
    try:
        listed = subprocess.run(
            [binary, "images", "--quiet", "--no-trunc"],
            capture_output=True,
            text=True,
            timeout=PODMAN_TIMEOUT_SECONDS,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`podman images` failed: {exc}"
    if listed.returncode != 0:
        return False, f"`podman images` failed: {listed.stderr.strip()[:200]}"
    count = len(set(listed.stdout.split()))
    return True, (
        f"root: image reads podman's local store ({count} image{'s' * (count != 1)}; "
        "nothing is ever pulled)"
    )


async def _podman(binary: str, *arguments: str) -> str:
    """Run podman (``binary``, see ``find_podman``); its stdout (stripped), or
    SandboxLaunchError saying what to do."""
    process = await asyncio.create_subprocess_exec(
        binary,
        *arguments,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
    )
    try:
        async with asyncio.timeout(PODMAN_TIMEOUT_SECONDS):
            out, err = await process.communicate()
    except BaseException:
        if process.returncode is None:
            process.kill()
            await asyncio.shield(process.wait())
        raise
    if process.returncode != 0:
        text = err.decode(errors="replace").strip()
        name = arguments[-1]
        if "image not known" in text or "no such image" in text.lower():
            raise SandboxLaunchError(
                f"image {name!r} is not in this machine's podman store, and forgehand never "
                f"pulls: put it there first (`podman pull {name}`, `podman load` or "
                "`podman import`), or use root: dir"
            )
        raise SandboxLaunchError(f"`podman {' '.join(arguments)}` failed: {text}")
    return out.decode(errors="replace").strip()


async def _podman_quietly(binary: str, *arguments: str) -> None:
    # A podman mount left counted keeps the image mounted; nothing else is lost.
    with contextlib.suppress(SandboxLaunchError, OSError):
        await _podman(binary, *arguments)
