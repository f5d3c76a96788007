"""Shared helpers for the step-language tests."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

WriteStep = Callable[[str, str], Path]


@pytest.fixture
def write_step(tmp_path: Path) -> WriteStep:
    """Write a dedented step file under tmp_path and return its path."""

    def write(relative: str, text: str) -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write
