"""cgroup detection and the v2 write paths, on a directory laid out like a v2 tree."""

from __future__ import annotations

from pathlib import Path

from forgehand.sandbox import cgroups
from forgehand.sandbox.cgroups import Controller


def test_v1_mounts_win_over_v2(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("memory pids cpu\n")
    memory, cpu = tmp_path / "memory", tmp_path / "cpu,cpuacct"
    memory.mkdir()
    cpu.mkdir()
    mounts = (
        f"cgroup {memory} cgroup rw,relatime,memory 0 0\n"
        f"cgroup {cpu} cgroup rw,cpu,cpuacct 0 0\n"
        f"cgroup2 {tmp_path} cgroup2 rw 0 0\n"
    )
    found = cgroups.detect_hierarchies(mounts)
    assert found[Controller.MEMORY] == cgroups.Hierarchy(Controller.MEMORY, memory, 1)
    assert found[Controller.CPU].mount == cpu
    assert found[Controller.PIDS] == cgroups.Hierarchy(Controller.PIDS, tmp_path, 2)


def test_later_binds_of_a_hierarchy_are_not_taken_for_it(tmp_path: Path) -> None:
    """A container manager may bind a group's directory, or one file of it, into a
    container's root on the host: both come after the hierarchy's own mount, and neither
    may replace it."""
    memory, view, group_bind = tmp_path / "memory", tmp_path / "ro-3", tmp_path / "group"
    memory.mkdir()
    view.touch()
    group_bind.mkdir()
    mounts = (
        f"cgroup {memory} cgroup rw,relatime,memory 0 0\n"
        f"cgroup {view} cgroup ro,nosuid,nodev,relatime,memory 0 0\n"
        f"cgroup {group_bind} cgroup rw,relatime,memory 0 0\n"
    )
    found = cgroups.detect_hierarchies(mounts)
    assert found[Controller.MEMORY] == cgroups.Hierarchy(Controller.MEMORY, memory, 1)


def test_v2_group_is_one_directory(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    found = cgroups.detect_hierarchies(f"cgroup2 {tmp_path} cgroup2 rw 0 0\n")
    (tmp_path / "forgehand").mkdir()
    (tmp_path / "forgehand" / "cgroup.subtree_control").write_text("")
    group = cgroups.CgroupGroup.create("v2test", found)
    assert len(group.dirs) == 1
    group.set_limits(64 << 20, 10, 1.5)
    directory = group.dirs[0]
    assert (directory / "memory.max").read_text() == str(64 << 20)
    assert (directory / "cpu.max").read_text() == "150000 100000"
    assert (directory / "pids.max").read_text() == "10"
    (directory / "memory.events").write_text("oom 1\noom_kill 2\n")
    assert group.oom_kills() == 2
