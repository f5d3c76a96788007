"""Local container images as sandbox roots (``root: image``), on every backend.

forgehand never pulls: the image must already be in this machine's (rootful) podman store,
put there by ``podman pull``, ``podman load`` or ``podman import``. At start, podman mounts
the image (``podman image mount``), the sandbox binds that mount read-only, nosuid and
nodev into its own directory (``<state>/<id>/image``), and podman's mount is released at
once: the bind keeps the image's file system alive for this sandbox alone, whatever other
sandboxes or podman do with the image meanwhile. From there on the image is a ``root: dir``
(``forgehand.sandbox.layout``). Destroy and ``forgehand sandbox gc`` detach the bind
(``rootfs.release_image``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

from forgehand.sandbox import readonly_views, rootfs
from forgehand.sandbox.errors import BackendUnavailable, SandboxLaunchError
from forgehand.sandbox.spec import DirRoot, ImageRoot, SandboxSpec

PODMAN_TIMEOUT_SECONDS = 120.0


async def as_dir_root(spec: SandboxSpec, directory: Path, podman: str = "podman") -> SandboxSpec:
    """``spec`` with a ``root: image`` replaced by the directory the image is bound at
    (``directory/image``); any other spec as it is. ``directory`` must be recorded in the
    registry already: from the bind on, ``release`` (destroy, gc) owns it."""
    if not isinstance(spec.root, ImageRoot):
        return spec
    path = await mount(directory, spec.root.name, podman)
    return spec.model_copy(update={"root": DirRoot(path=path)})


async def mount(directory: Path, name: str, podman: str = "podman") -> Path:
    """Bind the local image ``name`` read-only at ``directory/image``."""
    target = directory / rootfs.IMAGE_DIR
    binary = await asyncio.to_thread(find_podman, podman)  # missing: say so, unmount nothing
    try:
        merged = Path(await _podman(binary, "image", "mount", name))
        if not merged.is_absolute():
            raise SandboxLaunchError(f"`podman image mount {name}` gave no path: {merged}")
        await rootfs.blocking(readonly_views.bind_read_only, merged, target)
    finally:
        # Our bind holds the image's file system now; podman's own mount is not needed.
        # Also when cancelled, even right after podman mounted: its count must not stay
        # raised. (A cancel while `podman image mount` itself runs may find it had not
        # mounted yet; the unmount then lowers a count another user of the image raised.)
        await rootfs.uncancellable(_podman_quietly(binary, "image", "unmount", name))
    return target


def find_podman(podman: str = "podman") -> str:
    """The podman binary, or BackendUnavailable saying what to install."""
    found = shutil.which(podman)
    if found is None:
        raise BackendUnavailable(
            "a root: image sandbox reads the image from podman's local store, and podman is "
            "not installed: apt-get install podman (or use root: dir with an unpacked image)"
        )
    return found


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
