"""RunnerConfig: strict, with errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgehand.runner.config import MAX_STATE_DIR_CHARS, ConfigError, RunnerConfig


def test_defaults_and_normalised_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = RunnerConfig(state_dir=Path("state"), roots=(Path("work"),))
    assert config.state_dir == tmp_path / "state"
    assert config.roots == (tmp_path / "work",)
    assert config.max_runs == 64
    assert RunnerConfig(state_dir=tmp_path).file_roots() == (tmp_path,)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_runs", 0),
        ("max_runs", 10_001),
        ("max_runs", True),
        ("max_runs", "8"),
        ("journal_max_bytes_per_run", 1024),
        ("journal_max_bytes_total", 1),
        ("max_message_bytes", 512 << 20),
        ("max_stdin_chunk_bytes", 10),
        ("attach_batch_bytes", 1024),
        ("finished_run_ttl_seconds", 0),
        ("finished_run_ttl_seconds", "1"),
        ("memory_events", 3),
    ],
)
def test_out_of_range_values_name_the_field(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        RunnerConfig(state_dir=tmp_path, **{field: value})  # type: ignore[arg-type]


def test_long_state_dir_is_refused() -> None:
    with pytest.raises(ConfigError, match="state_dir"):
        RunnerConfig(state_dir=Path("/" + "d" * MAX_STATE_DIR_CHARS))


def test_unknown_keys_and_changes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="max_run"):
        RunnerConfig(state_dir=tmp_path, max_run=3)  # type: ignore[call-arg]
    config = RunnerConfig(state_dir=tmp_path)
    with pytest.raises(AttributeError):
        config.max_runs = 3  # type: ignore[misc]
