"""Limits groups for sandboxes, on cgroup v1, v2 or a hybrid of both.

Each sandbox gets one group, ``forgehand/<sandbox-id>.<owner-pid>-<owner-start>``, in
every hierarchy that carries one of the controllers we use (memory, pids, cpu). On a v2
system that is one directory; on v1 it is one per controller. The owner suffix lets
``gc()`` tell a group a crashed service left behind from one still in use.

Processes are only ever added by pid by the code that spawned them, and only the
members of our own groups are signalled: a pid is signalled through a pidfd opened
*before* checking that it is still a member, so a recycled pid is never hit.

Everything here is synchronous sysfs I/O; async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from forgehand.sandbox.errors import CgroupError

PARENT = "forgehand"
CPU_PERIOD_US = 100_000
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NAME_RE = re.compile(r"^(?P<id>[A-Za-z0-9_-]{1,64})\.(?P<pid>\d+)-(?P<start>\d+)$")


class Controller(StrEnum):
    """The cgroup controllers a sandbox uses."""

    MEMORY = "memory"
    PIDS = "pids"
    CPU = "cpu"


@dataclass(frozen=True)
class Hierarchy:
    """Where one controller is mounted, and in which cgroup version."""

    controller: Controller
    mount: Path
    version: int


def detect_hierarchies(mounts: str | None = None) -> dict[Controller, Hierarchy]:
    """Find each controller's hierarchy; a v1 mount wins over the v2 tree for a controller.

    A controller's first mount on a directory is its hierarchy. Later ones are binds of
    a part of it (a container manager binding a group's directory, or one file of it,
    into a container's root on the host) and must not be taken for the hierarchy."""
    text = mounts if mounts is not None else Path("/proc/self/mounts").read_text()
    found: dict[Controller, Hierarchy] = {}
    for fields in (line.split() for line in text.splitlines()):
        if len(fields) >= 4 and fields[2] == "cgroup" and Path(fields[1]).is_dir():
            for controller in Controller:
                if controller.value in fields[3].split(","):
                    found.setdefault(controller, Hierarchy(controller, Path(fields[1]), 1))
    for fields in (line.split() for line in text.splitlines()):
        if len(fields) >= 4 and fields[2] == "cgroup2":
            for controller in _v2_controllers(Path(fields[1])):
                found.setdefault(controller, Hierarchy(controller, Path(fields[1]), 2))
    return found


def _v2_controllers(mount: Path) -> list[Controller]:
    try:
        names = (mount / "cgroup.controllers").read_text().split()
    except OSError:
        return []
    return [c for c in Controller if c.value in names]


def require_hierarchies(found: Mapping[Controller, Hierarchy]) -> dict[Controller, Hierarchy]:
    """``found`` if it covers every controller, else a CgroupError saying what to enable."""
    missing = [c.value for c in Controller if c not in found]
    if missing:
        raise CgroupError(
            f"cgroup controllers not available: {', '.join(missing)}; mount them (v1) or "
            "enable them in the v2 tree, or choose backend=gvisor"
        )
    return dict(found)


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


class CgroupGroup:
    """One sandbox's limits group across the hierarchies that carry our controllers."""

    def __init__(self, name: str, hierarchies: Mapping[Controller, Hierarchy]) -> None:
        self.name = name
        self.hierarchies = dict(hierarchies)

    @classmethod
    def create(
        cls, sandbox_id: str, hierarchies: Mapping[Controller, Hierarchy] | None = None
    ) -> CgroupGroup:
        """Create the group for ``sandbox_id``, owned by this process."""
        group = cls.for_sandbox(sandbox_id, hierarchies)
        group.make()
        return group

    @classmethod
    def for_sandbox(
        cls, sandbox_id: str, hierarchies: Mapping[Controller, Hierarchy] | None = None
    ) -> CgroupGroup:
        """The group ``sandbox_id`` gets, owned by this process, not made yet (``make``).
        A sandbox holds it before making it, so that a start cancelled while the
        directories are made still removes them."""
        if not _ID_RE.match(sandbox_id):
            raise CgroupError(f"sandbox id {sandbox_id!r} must match {_ID_RE.pattern}")
        found = require_hierarchies(hierarchies or detect_hierarchies())
        owner = os.getpid()
        return cls(f"{sandbox_id}.{owner}-{process_start_time(owner)}", found)

    def dir(self, controller: Controller) -> Path:
        """The group's directory in ``controller``'s hierarchy."""
        hierarchy = self.hierarchies[controller]
        return hierarchy.mount / PARENT / self.name

    @property
    def dirs(self) -> list[Path]:
        """The group's distinct directories (one on v2, up to one per controller on v1)."""
        return list(dict.fromkeys(self.dir(c) for c in self.hierarchies))

    @property
    def procs_files(self) -> list[Path]:
        """The ``cgroup.procs`` files a process writes its pid into to join the group."""
        return [d / "cgroup.procs" for d in self.dirs]

    def make(self) -> None:
        """Create the group's directories (a failure removes what was made)."""
        for controller, hierarchy in self.hierarchies.items():
            if hierarchy.version == 2:
                _enable_v2(hierarchy.mount, controller)
        for path in self.dirs:
            try:
                path.mkdir(parents=True)
            except OSError as exc:
                self.remove()
                raise CgroupError(f"cannot create cgroup {path}: {exc}; run as root") from exc

    def set_limits(self, memory_bytes: int, pids: int, cpu_cores: float) -> None:
        """Apply memory (swap included), pids and CPU bandwidth limits."""
        self._set_memory(memory_bytes)
        self._write(Controller.PIDS, "pids.max", str(pids))
        quota = max(1000, int(cpu_cores * CPU_PERIOD_US))
        if self._version(Controller.CPU) == 1:
            self._write(Controller.CPU, "cpu.cfs_period_us", str(CPU_PERIOD_US))
            self._write(Controller.CPU, "cpu.cfs_quota_us", str(quota))
        else:
            self._write(Controller.CPU, "cpu.max", f"{quota} {CPU_PERIOD_US}")

    def _set_memory(self, limit: int) -> None:
        if self._version(Controller.MEMORY) == 1:
            self._write(Controller.MEMORY, "memory.limit_in_bytes", str(limit))
            self._write_if_present(Controller.MEMORY, "memory.memsw.limit_in_bytes", str(limit))
        else:
            self._write(Controller.MEMORY, "memory.max", str(limit))
            self._write_if_present(Controller.MEMORY, "memory.swap.max", "0")

    def read_limits(self) -> tuple[int, int, float]:
        """The limits the kernel really applies: memory bytes, pids, CPU cores."""
        if self._version(Controller.MEMORY) == 1:
            memory = self._read(Controller.MEMORY, "memory.limit_in_bytes")
        else:
            memory = self._read(Controller.MEMORY, "memory.max")
        pids = self._read(Controller.PIDS, "pids.max")
        if self._version(Controller.CPU) == 1:
            quota = self._read(Controller.CPU, "cpu.cfs_quota_us")
            period = self._read(Controller.CPU, "cpu.cfs_period_us")
        else:
            quota, _, period = self._read(Controller.CPU, "cpu.max").partition(" ")
        return int(memory), int(pids), int(quota) / int(period)

    def memory_events_file(self) -> Path:
        """The file whose ``oom_kill`` line counts OOM kills (v2 memory.events, v1
        memory.oom_control); what ``forgehand-runner --memory-events`` reads."""
        name = "memory.events" if self._version(Controller.MEMORY) == 2 else "memory.oom_control"
        return self.dir(Controller.MEMORY) / name

    def _read(self, controller: Controller, name: str) -> str:
        return (self.dir(controller) / name).read_text().strip()

    def add_pid(self, pid: int) -> None:
        """Move ``pid`` (a process this service started) into every hierarchy of the group."""
        for procs in self.procs_files:
            _write_file(procs, str(pid))

    def pids(self) -> set[int]:
        """The pids currently in the group."""
        members: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(FileNotFoundError):
                members.update(int(line) for line in procs.read_text().split())
        return members

    def oom_kills(self) -> int:
        """How many processes of this group the kernel's OOM killer has ended so far."""
        if self._version(Controller.MEMORY) == 2:
            return _counter(self.dir(Controller.MEMORY) / "memory.events", "oom_kill")
        control = self.dir(Controller.MEMORY) / "memory.oom_control"
        if "oom_kill " in control.read_text():
            return _counter(control, "oom_kill")
        # Kernels before 4.13 lack the counter; hitting the limit is the best evidence.
        return int((self.dir(Controller.MEMORY) / "memory.failcnt").read_text())

    def signal_members(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to every member; returns how many were signalled."""
        kill_file = self.dir(Controller.PIDS) / "cgroup.kill"
        if sig == signal.SIGKILL and kill_file.exists():
            members = len(self.pids())
            _write_file(kill_file, "1")
            return members
        return sum(self._signal_one(pid, sig) for pid in self.pids())

    def _signal_one(self, pid: int, sig: int) -> bool:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        try:
            if pid not in self.pids():
                return False
            signal.pidfd_send_signal(pidfd, sig)
            return True
        except ProcessLookupError:
            return False
        finally:
            os.close(pidfd)

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every member until the group is empty (blocking; see ``bwrap`` for async)."""
        deadline = time.monotonic() + timeout
        while self.signal_members() or self.pids():
            if time.monotonic() > deadline:
                raise CgroupError(f"processes of cgroup {self.name} survived SIGKILL; see dmesg")
            time.sleep(0.01)

    def try_remove(self) -> bool:
        """Remove the group's directories; False while a member still holds one."""
        done = True
        for path in self.dirs:
            try:
                path.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise CgroupError(f"cannot remove cgroup {path}: {exc}") from exc
                done = False
        return done

    def remove(self, timeout: float = 5.0) -> None:
        """Kill the members and remove the group (blocking)."""
        deadline = time.monotonic() + timeout
        self.kill_all(timeout)
        while not self.try_remove():
            if time.monotonic() > deadline:
                raise CgroupError(f"cgroup {self.name} stays busy; kill its members and retry")
            time.sleep(0.01)

    def _version(self, controller: Controller) -> int:
        return self.hierarchies[controller].version

    def _write(self, controller: Controller, name: str, value: str) -> None:
        _write_file(self.dir(controller) / name, value)

    def _write_if_present(self, controller: Controller, name: str, value: str) -> None:
        path = self.dir(controller) / name
        if path.exists():
            _write_file(path, value)


def _write_file(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc}; run as root") from exc


def _counter(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def _enable_v2(mount: Path, controller: Controller) -> None:
    """Delegate ``controller`` from the v2 root through our parent to its children."""
    parent = mount / PARENT
    parent.mkdir(exist_ok=True)
    for path in (mount, parent):
        control = path / "cgroup.subtree_control"
        if controller.value not in control.read_text().split():
            _write_file(control, f"+{controller.value}")


@dataclass(frozen=True)
class GroupInfo:
    """A group found under our parent, with what is known about its owner."""

    name: str
    sandbox_id: str | None
    owner_pid: int | None
    owner_start: int | None

    @property
    def owner_alive(self) -> bool:
        """Whether the process that created the group still runs (pid reuse excluded)."""
        if self.owner_pid is None:
            return False
        return process_start_time(self.owner_pid) == self.owner_start


def list_groups(hierarchies: Mapping[Controller, Hierarchy] | None = None) -> list[GroupInfo]:
    """Every group under ``forgehand/`` in any of our hierarchies."""
    found = hierarchies if hierarchies is not None else detect_hierarchies()
    names = sorted(set(_child_names(h.mount / PARENT for h in found.values())))
    return [_info(name) for name in names]


def _child_names(parents: Iterable[Path]) -> Iterable[str]:
    for parent in parents:
        if parent.is_dir():
            yield from (p.name for p in parent.iterdir() if p.is_dir())


def _info(name: str) -> GroupInfo:
    match = _NAME_RE.match(name)
    if match is None:
        return GroupInfo(name, None, None, None)
    return GroupInfo(name, match["id"], int(match["pid"]), int(match["start"]))


def gc(hierarchies: Mapping[Controller, Hierarchy] | None = None) -> list[str]:
    """Remove groups whose owner is gone, killing their members; returns their names.

    Groups of unknown ownership (names we did not generate) are removed only when empty.
    Empty groups of a live owner are left alone: a sandbox between two commands is empty.
    """
    found = hierarchies if hierarchies is not None else detect_hierarchies()
    removed = []
    for info in list_groups(found):
        if info.owner_alive:
            continue
        group = CgroupGroup(info.name, found)
        if info.owner_pid is None and group.pids():
            continue
        group.remove()
        removed.append(info.name)
    return removed
