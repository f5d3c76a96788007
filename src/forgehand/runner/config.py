"""The runner daemon's configuration: one strict model, read once at start-up."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

MIB = 1024 * 1024
# Unix socket paths are limited to 107 bytes; a run's control socket lives at
# <state_dir>/ctl/<16 hex>.sock, so the state dir itself must stay short.
MAX_STATE_DIR_CHARS = 80


class RunnerConfig(BaseModel):
    """Settings of one `forgehand-runner serve` daemon."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dir: Path
    """Where journals and control sockets live. Restarting on the same dir resumes every run."""
    roots: tuple[Path, ...] = ()
    """Directories the file RPCs may touch; empty means the daemon's working directory."""
    max_runs: int = Field(default=64, ge=1, le=10_000)
    """Runs that may be running at once; one more is RESOURCE_EXHAUSTED."""
    journal_max_bytes_per_run: int = Field(default=64 * MIB, ge=256 * 1024)
    """Past this a run's journal keeps its head and tail and drops the middle."""
    journal_max_bytes_total: int = Field(default=2048 * MIB, ge=MIB)
    """All journals together; finished runs are pruned oldest first to stay under it."""
    finished_run_ttl_seconds: float = Field(default=24 * 3600.0, gt=0)
    """Finished runs nobody closed are forgotten after this long."""
    max_message_bytes: int = Field(default=16 * MIB, ge=MIB, le=256 * MIB)
    """Largest gRPC message the daemon sends or accepts."""
    max_stdin_chunk_bytes: int = Field(default=4 * MIB, ge=1024)
    """Largest single WriteStdin payload."""
    attach_batch_bytes: int = Field(default=2 * MIB, ge=64 * 1024)
    """Output bytes per Attach message when the client does not say."""
    memory_events: str = ""
    """A cgroup's memory.events (v2) or memory.oom_control (v1): tells OOM kills apart."""

    @field_validator("state_dir")
    @classmethod
    def _short_absolute(cls, value: Path) -> Path:
        value = value.absolute()
        if len(str(value)) > MAX_STATE_DIR_CHARS:
            raise ValueError(
                f"state_dir is {len(str(value))} characters long; unix socket paths are "
                f"limited, so use a directory of at most {MAX_STATE_DIR_CHARS} characters"
            )
        return value

    @field_validator("roots")
    @classmethod
    def _absolute_roots(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        return tuple(root.absolute() for root in value)

    def file_roots(self) -> tuple[Path, ...]:
        return self.roots or (Path.cwd(),)
