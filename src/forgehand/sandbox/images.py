"""Local container images as sandbox roots (``root: image``), on every backend.

forgehand never pulls: the image must already be in this machine's (rootful) podman store,
put there by ``podman pull``, ``podman load`` or ``podman import``. At start, the image's
name is resolved to its ID once (``podman image inspect``); from there on everything names
the image by that ID, so a re-tag meanwhile cannot swap the image or make ``Achieved.root``
lie.

The sandbox then creates a *hold container* of the image, never started (``podman create``,
named after the sandbox's directory, ``hold_name``), mounts that container's file system
(``podman mount``) and binds it read-only, nosuid and nodev into its own directory
(``<state>/<id>/image``). From there on the image is a ``root: dir``
(``forgehand.sandbox.layout``). Why a container, and not ``podman image mount``:

- podman refuses to remove an image a container uses, so the image stays while the
  sandbox runs. It removes a mounted image without a word (even without ``--force``),
  and the sandbox's root then vanished under it.
- The container's mount count is the sandbox's alone. An image's mount count is shared
  by everyone who mounts it, and a cancelled start could not tell whether it had raised it.

The directory records the hold's name (``HOLD_FILE``) before the container is created.
Destroy and ``forgehand sandbox gc`` (``release``) detach the bind and remove the
container (``podman rm --force`` unmounts it), whatever step a start was cut at.
"""

from __future__ import annotations

import asyncio
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
IMAGE_DIR = "image"
"""Where the image is bound, in the sandbox's own directory."""
HOLD_FILE = "image-hold"
"""In a sandbox's directory: the name of its hold container, written before it is made."""
HOLD_LABEL = "forgehand.image-hold"
"""Label of every hold container; its value is the sandbox directory that holds it."""
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
    """The full image ID (64 hex): what the hold container is made of, and reported."""

    def __str__(self) -> str:
        return f"image {self.name} (sha256:{self.id[:12]})"


async def as_dir_root(spec: SandboxSpec, directory: Path, podman: str = "podman") -> ResolvedRoot:
    """``spec`` with a ``root: image`` replaced by the directory the image is bound at
    (``directory/image``); any other spec as it is. ``directory`` must be recorded in the
    registry already: from the hold's record on, ``release`` (destroy, gc) owns it."""
    if isinstance(spec.root, ImageRoot):
        path, image = await mount(directory, spec.root.name, podman)
        return ResolvedRoot(spec.model_copy(update={"root": DirRoot(path=path)}), str(image))
    if isinstance(spec.root, DirRoot):
        return ResolvedRoot(spec, f"dir {spec.root.path}")
    return ResolvedRoot(spec, "host")


def hold_name(directory: Path) -> str:
    """The hold container of the sandbox whose directory is ``directory``."""
    return "forgehand-image-" + hashlib.sha256(str(directory).encode()).hexdigest()[:20]


async def mount(directory: Path, name: str, podman: str = "podman") -> tuple[Path, Image]:
    """Bind the local image ``name`` read-only at ``directory/image``, held by a container
    of this sandbox's own; that path and the image bound there."""
    binary = await asyncio.to_thread(find_podman, podman)  # missing: say so, hold nothing
    image = await _inspect(binary, name)
    hold = hold_name(directory)
    await rootfs.blocking((directory / HOLD_FILE).write_text, hold + "\n")
    await _finished(
        binary,
        *("create", "--pull", "never", "--name", hold, "--label", f"{HOLD_LABEL}={directory}"),
        # An image's VOLUMEs would become anonymous volumes that outlive the container.
        *("--image-volume", "ignore", "--network", "none", "--entrypoint", "/nonexistent"),
        image.id,
    )
    merged = Path(await _finished(binary, "mount", hold))
    if not merged.is_absolute():
        raise SandboxLaunchError(f"`podman mount` of image {image.name} gave no path: {merged}")
    target = directory / IMAGE_DIR
    await rootfs.blocking(readonly_views.bind_read_only, merged, target)
    return target, image


def release(directory: Path, podman: str = "podman") -> None:
    """Detach the image bound in the sandbox directory ``directory`` and remove its hold
    container, if any. Blocking; safe to repeat, and after a start cut at any step."""
    bound = directory / IMAGE_DIR
    if bound.exists():
        readonly_views.release_below(bound)
    record = directory / HOLD_FILE
    if not record.exists():
        return
    binary = shutil.which(podman)
    if binary is None:
        raise SandboxLaunchError(
            f"cannot remove the hold container {hold_name(directory)}: podman is gone"
        )
    _run(binary, "rm", "--force", "--volumes", "--ignore", "--time", "0", hold_name(directory))
    record.unlink()


def remove_orphan_holds(podman: str = "podman") -> list[str]:
    """Remove the hold containers whose sandbox directory is gone (a reboot empties /run,
    where the directories live, but not podman's store): they would keep their images
    from ever being removed. The names removed. Blocking."""
    binary = shutil.which(podman)
    if binary is None:
        return []
    template = f'{{{{.Names}}}}\t{{{{index .Labels "{HOLD_LABEL}"}}}}'
    listing = _run(binary, "ps", "--all", "--filter", f"label={HOLD_LABEL}", "--format", template)
    removed = []
    for line in listing.splitlines():
        name, _, directory = line.partition("\t")
        if name.startswith("forgehand-image-") and directory and not Path(directory).exists():
            _run(binary, "rm", "--force", "--volumes", "--ignore", "--time", "0", name)
            removed.append(name)
    return removed


def _run(binary: str, *arguments: str) -> str:
    """Run podman, blocking; its stdout, or SandboxLaunchError with its complaint."""
    done = subprocess.run(
        [binary, *arguments],
        capture_output=True,
        text=True,
        timeout=PODMAN_TIMEOUT_SECONDS,
        env=_podman_env(),
        check=False,
    )
    if done.returncode != 0:
        raise SandboxLaunchError(f"`podman {' '.join(arguments)}` failed: {done.stderr[:300]}")
    return done.stdout


async def _finished(binary: str, *arguments: str) -> str:
    """``_podman``, left to finish when its caller is cancelled: podman killed halfway
    through making a container may leave storage that ``podman rm`` does not know."""
    return await rootfs.uncancellable(_podman(binary, *arguments))


async def _inspect(binary: str, name: str) -> Image:
    """``name`` resolved by podman to its ID."""
    text = await _podman(binary, "image", "inspect", name)
    try:
        image_id: Any = json.loads(text)[0]["Id"]
    except (ValueError, LookupError, TypeError) as exc:
        raise SandboxLaunchError(
            f"`podman image inspect {name}` gave no image: {text[:200]}"
        ) from exc
    if not isinstance(image_id, str) or not _IMAGE_ID.match(image_id):
        raise SandboxLaunchError(f"`podman image inspect {name}` gave an odd ID: {image_id!r}")
    return Image(name, image_id)


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
            env=_podman_env(),
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
        env=_podman_env(),
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


def _podman_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
