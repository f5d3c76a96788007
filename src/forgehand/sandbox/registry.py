"""Where a machine's sandboxes are recorded, so other processes can list and reap them.

Each sandbox has a directory ``<root>/<sandbox-id>/`` holding ``record.json`` (backend,
owner pid and its start time, the work dir and whether the backend made it) next to the
backend's own files (sockets, logs). The owner writes the record before it creates
anything else, so whatever a crash leaves behind is findable. A record whose owner
process is gone (pid reuse excluded by the start time) is a *leftover*.

Everything here is synchronous file I/O; async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from forgehand.sandbox.backend import SandboxRecord
from forgehand.sandbox.cgroups import process_start_time
from forgehand.sandbox.errors import SandboxLaunchError

DEFAULT_ROOT = Path("/run/forgehand/sandboxes")
RECORD = "record.json"
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ORPHAN_AGE_SECONDS = 300.0


@dataclass(frozen=True)
class Entry:
    """One sandbox's record."""

    backend: str
    sandbox_id: str
    owner_pid: int
    owner_start: int | None
    work_dir: str
    work_dir_made: bool
    created: float = field(default_factory=time.time)

    @property
    def owner_alive(self) -> bool:
        """Whether the process that created the sandbox still runs."""
        return process_start_time(self.owner_pid) == self.owner_start


def own_entry(backend: str, sandbox_id: str, work_dir: Path, work_dir_made: bool) -> Entry:
    """A record owned by this process."""
    pid = os.getpid()
    return Entry(backend, sandbox_id, pid, process_start_time(pid), str(work_dir), work_dir_made)


class Registry:
    """The sandbox records under one root directory."""

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root

    def directory(self, sandbox_id: str) -> Path:
        """The sandbox's own directory (it need not exist yet)."""
        if not _ID_RE.match(sandbox_id):
            raise SandboxLaunchError(f"sandbox id {sandbox_id!r} must match {_ID_RE.pattern}")
        return self.root / sandbox_id

    def add(self, entry: Entry) -> Path:
        """Create the sandbox's directory (searchable, not listable) and its record."""
        try:
            self.root.mkdir(mode=0o711, parents=True, exist_ok=True)
            directory = self.directory(entry.sandbox_id)
            directory.mkdir(mode=0o711)
            directory.chmod(0o711)  # the umask may have narrowed it
            _write_atomic(directory / RECORD, json.dumps(asdict(entry)))
        except OSError as exc:
            raise SandboxLaunchError(
                f"cannot record sandbox {entry.sandbox_id} under {self.root}: {exc}; "
                "run as root or configure a writable state dir"
            ) from exc
        return directory

    def entries(self, backend: str | None = None) -> list[Entry]:
        """Every readable record, optionally of one backend, oldest first."""
        if not self.root.is_dir():
            return []
        found = [_read(path / RECORD) for path in self.root.iterdir() if path.is_dir()]
        chosen = [e for e in found if e is not None and backend in (None, e.backend)]
        return sorted(chosen, key=lambda e: e.created)

    def remove(self, sandbox_id: str) -> None:
        """Delete the sandbox's directory and everything in it."""
        shutil.rmtree(self.directory(sandbox_id), ignore_errors=True)

    def sweep_unrecorded(self, min_age_seconds: float = ORPHAN_AGE_SECONDS) -> list[str]:
        """Delete sandbox directories that have no record (a start cut short between
        creating the directory and recording it, or files a cleanup raced), once older than
        ``min_age_seconds`` (a sandbox being created right now has no record yet either).
        A directory with anything mounted below it is left alone. The ids removed."""
        if not self.root.is_dir():
            return []
        mounted = _mount_points()
        removed = []
        for path in self.root.iterdir():
            if not path.is_dir() or path.is_symlink() or (path / RECORD).exists():
                continue
            if not _ID_RE.match(path.name) or time.time() - path.stat().st_mtime < min_age_seconds:
                continue
            if any(m == path or m.is_relative_to(path) for m in mounted):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        return removed


def _mount_points() -> list[Path]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as info:
        return [Path(_unescape(line.split()[4])) for line in info if line.strip()]


def _unescape(field: str) -> str:
    """Mount points in mountinfo escape space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _read(path: Path) -> Entry | None:
    with contextlib.suppress(OSError, ValueError, TypeError):
        return Entry(**json.loads(path.read_text()))
    return None


def entry_record(backend: str, entry: Entry) -> SandboxRecord:
    """How `forgehand sandbox ls` shows a registry entry."""
    state: Literal["running", "leftover"] = "running" if entry.owner_alive else "leftover"
    return SandboxRecord(
        backend, entry.sandbox_id, state, entry.owner_pid, f"work {entry.work_dir}"
    )


async def list_records(registry: Registry, backend: str) -> list[SandboxRecord]:
    """The backend's sandboxes on this machine, live or left behind."""
    entries = await asyncio.to_thread(registry.entries, backend)
    return [entry_record(backend, entry) for entry in entries]


async def reap_leftovers(
    registry: Registry, backend: str, reap_one: Callable[[Entry], Awaitable[None]]
) -> list[SandboxRecord]:
    """Remove, with ``reap_one``, every sandbox of the backend whose owner is gone, then
    the directories that never got a record (``Registry.sweep_unrecorded``)."""
    entries = await asyncio.to_thread(registry.entries, backend)
    leftovers = [entry for entry in entries if not entry.owner_alive]
    for entry in leftovers:
        await reap_one(entry)
    swept = await asyncio.to_thread(registry.sweep_unrecorded)
    return [entry_record(backend, entry) for entry in leftovers] + [
        SandboxRecord(backend, name, "leftover", 0, "a start cut short: no record")
        for name in swept
    ]
