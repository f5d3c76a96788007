"""The runner daemon's configuration: one strict model, read once at start-up.

A frozen dataclass checked in ``__post_init__``, not a pydantic model: the daemon runs in
every sandbox, and importing pydantic and building a model's schema cost each one about
7 MiB of private memory and 100 ms of start-up (``forgehand bench sandbox``). Unknown
keys are a ``TypeError``; bad values a ``ConfigError`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024
# Unix socket paths are limited to 107 bytes; a run's control socket lives at
# <state_dir>/ctl/<16 hex>.sock, so the state dir itself must stay short.
MAX_STATE_DIR_CHARS = 80


class ConfigError(ValueError):
    """A setting is out of range; the message names it."""


@dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    """Settings of one `forgehand-runner serve` daemon."""

    state_dir: Path
    """Where journals and control sockets live. Restarting on the same dir resumes every run."""
    roots: tuple[Path, ...] = ()
    """Directories the file RPCs may touch; empty means the daemon's working directory."""
    max_runs: int = 64
    """Runs that may be running at once (1 to 10 000); one more is RESOURCE_EXHAUSTED."""
    journal_max_bytes_per_run: int = 64 * MIB
    """Past this (at least 256 KiB) a run's journal keeps its head and tail and drops the
    middle."""
    journal_max_bytes_total: int = 2048 * MIB
    """All journals together (at least 1 MiB); finished runs are pruned oldest first."""
    finished_run_ttl_seconds: float = 24 * 3600.0
    """Finished runs nobody closed are forgotten after this long (> 0)."""
    max_message_bytes: int = 16 * MIB
    """Largest gRPC message the daemon sends or accepts (1 to 256 MiB)."""
    max_stdin_chunk_bytes: int = 4 * MIB
    """Largest single WriteStdin payload (at least 1 KiB)."""
    attach_batch_bytes: int = 2 * MIB
    """Output bytes per Attach message when the client does not say (at least 64 KiB)."""
    memory_events: str = ""
    """A cgroup's memory.events (v2) or memory.oom_control (v1): tells OOM kills apart."""

    def __post_init__(self) -> None:
        _set(self, "state_dir", _short_absolute(Path(self.state_dir)))
        _set(self, "roots", tuple(Path(root).absolute() for root in self.roots))
        _int_range("max_runs", self.max_runs, 1, 10_000)
        _int_range("journal_max_bytes_per_run", self.journal_max_bytes_per_run, 256 * 1024)
        _int_range("journal_max_bytes_total", self.journal_max_bytes_total, MIB)
        _int_range("max_message_bytes", self.max_message_bytes, MIB, 256 * MIB)
        _int_range("max_stdin_chunk_bytes", self.max_stdin_chunk_bytes, 1024)
        _int_range("attach_batch_bytes", self.attach_batch_bytes, 64 * 1024)
        ttl = self.finished_run_ttl_seconds
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
            raise ConfigError(f"finished_run_ttl_seconds must be a number > 0, not {ttl!r}")
        if not isinstance(self.memory_events, str):
            raise ConfigError(f"memory_events must be a path string, not {self.memory_events!r}")

    def file_roots(self) -> tuple[Path, ...]:
        return self.roots or (Path.cwd(),)


def _set(config: RunnerConfig, name: str, value: object) -> None:
    object.__setattr__(config, name, value)


def _short_absolute(value: Path) -> Path:
    value = value.absolute()
    if len(str(value)) > MAX_STATE_DIR_CHARS:
        raise ConfigError(
            f"state_dir is {len(str(value))} characters long; unix socket paths are "
            f"limited, so use a directory of at most {MAX_STATE_DIR_CHARS} characters"
        )
    return value


def _int_range(name: str, value: object, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and isinstance(value, int) and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name} must be an integer {bound}, not {value!r}")


DIRECT_SUFFIX = ".direct"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, NUL included


def direct_socket_path(grpc_socket: Path) -> Path | None:
    """Where the direct channel of the daemon serving ``grpc_socket`` listens, or None when
    that path would not fit in a unix socket address."""
    path = grpc_socket.with_name(grpc_socket.name + DIRECT_SUFFIX)
    return path if len(str(path).encode()) <= MAX_SOCKET_PATH else None
