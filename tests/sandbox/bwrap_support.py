"""What the tests that start real bubblewrap sandboxes share: when they can run, and a
scratch directory that is unmounted and removed after them."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgehand.sandbox import cgroups

NEEDS_BWRAP = [
    pytest.mark.needs_root,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="install the `bubblewrap` package"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: cgroups and tmpfs mounts"),
    pytest.mark.skipif(
        len(cgroups.detect_hierarchies()) < len(cgroups.Controller),
        reason="needs memory, pids and cpu cgroup controllers",
    ),
]


def mounts_under(path: Path) -> list[str]:
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [line.split()[1] for line in lines if line.split()[1].startswith(f"{path}/")]


def scratch_dir(prefix: str) -> Iterator[Path]:
    """A fixture body: a directory under /tmp a sandbox user can traverse; afterwards
    whatever a sandbox left mounted below it is unmounted, and it is removed."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o711)
    yield path
    for mount in reversed(mounts_under(path)):
        subprocess.run(["umount", "-l", mount], check=False)
    shutil.rmtree(path, ignore_errors=True)
