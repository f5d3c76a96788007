"""The sandbox registry: records, and directories a cut-short start left without one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from forgehand.sandbox.registry import RECORD, Registry, own_entry, reap_leftovers


def test_unrecorded_directories_are_swept_once_old(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.add(own_entry("test", "recorded", tmp_path / "w", False))
    (tmp_path / "cut-short" / "rootfs").mkdir(parents=True)
    (tmp_path / "fresh").mkdir()
    old = (tmp_path / "cut-short").stat().st_mtime - 3600
    os.utime(tmp_path / "cut-short", (old, old))
    assert registry.sweep_unrecorded(min_age_seconds=600) == ["cut-short"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "recorded"]
    assert (tmp_path / "recorded" / RECORD).is_file()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_directory_with_a_mount_below_is_left_alone(tmp_path: Path) -> None:
    mounted = tmp_path / "busy" / "sock"
    mounted.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mounted)], check=True)
    try:
        (mounted / "keep").write_text("not ours to delete")
        assert Registry(tmp_path).sweep_unrecorded(min_age_seconds=0) == []
        assert (mounted / "keep").read_text() == "not ours to delete"
    finally:
        subprocess.run(["umount", str(mounted)], check=True)


async def test_reaping_reports_swept_directories(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    (tmp_path / "cut-short").mkdir()
    old = (tmp_path / "cut-short").stat().st_mtime - 3600
    os.utime(tmp_path / "cut-short", (old, old))

    async def reap_one(_entry: object) -> None:
        raise AssertionError("no recorded leftover here")

    records = await reap_leftovers(registry, "test", reap_one)
    assert [(r.sandbox_id, r.state) for r in records] == [("cut-short", "leftover")]
    assert not (tmp_path / "cut-short").exists()
