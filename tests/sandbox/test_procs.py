"""``procs.address_spaces`` and the bench's memory sums: shared address spaces count once."""

from __future__ import annotations

import os
import subprocess
import sys

from forgehand.bench.sandbox import pss_bytes
from forgehand.sandbox import procs


def test_one_process_is_one_address_space() -> None:
    assert procs.address_spaces([os.getpid(), os.getpid()]) == [os.getpid()]


def test_a_forked_child_has_its_own_address_space() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert procs.address_spaces([child.pid, os.getpid()]) == sorted([os.getpid(), child.pid])
        both = pss_bytes({os.getpid(), child.pid})
        assert both > pss_bytes({os.getpid()}) > 0
    finally:
        child.kill()
        child.wait()


def test_vanished_processes_count_nothing() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    assert pss_bytes({child.pid}) == 0
