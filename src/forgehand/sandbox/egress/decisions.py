"""The decision log: one JSON line per proxy decision, in a file and in memory."""

from __future__ import annotations

import asyncio
import collections
import datetime
import os
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, Field

from forgehand.sandbox.egress.errors import EgressStartError, EgressStateError, Verdict


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Decision(BaseModel):
    """One decision of the proxy about one client request."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    time: datetime.datetime = Field(default_factory=_now)
    """When the decision was made (UTC)."""

    host: str | None
    """Requested host name or IP literal; None when the request could not be parsed."""

    port: int | None
    """Requested port; None when the request could not be parsed."""

    method: str | None
    """HTTP method (CONNECT for TLS tunnels); None when the request could not be parsed."""

    decision: Verdict
    """`allowed`; `denied` by policy (403); `failed`: allowed but the upstream could not be
    resolved or reached (502); `rejected`: malformed, oversized or over a limit (400/503)."""

    rule: str | None = None
    """The allowlist rule that matched, if any."""

    reason: str
    """Why, in words an agent can act on."""

    address: str | None = None
    """The resolved address that was checked and connected to, if any."""


class DecisionLog:
    """Appends decisions to a JSON-lines file and keeps the latest ones in memory."""

    def __init__(self, path: Path, *, keep: int) -> None:
        self.path = path
        self._recent: collections.deque[Decision] = collections.deque(maxlen=keep)
        self._file: IO[str] | None = None
        self._lock = asyncio.Lock()

    @property
    def recent(self) -> tuple[Decision, ...]:
        """The decisions kept in memory, oldest first."""
        return tuple(self._recent)

    def open(self) -> None:
        """Create the file (and its parents) for appending. In the event loop's thread (a
        local file): a caller cancelled meanwhile cannot lose a file a thread opened."""
        try:
            self._file = _open_for_append(self.path)
        except OSError as exc:
            raise EgressStartError(
                f"cannot open decision log {self.path}: {exc}; choose a writable path"
            ) from exc

    async def record(self, decision: Decision) -> None:
        """Keep `decision` in memory and append it to the file."""
        if self._file is None:
            raise EgressStateError("decision log is not open: call open() first")
        self._recent.append(decision)
        line = decision.model_dump_json() + "\n"
        async with self._lock:
            await asyncio.to_thread(_append, self._file, line)

    async def close(self) -> None:
        """Close the file; the in-memory decisions stay readable."""
        if self._file is not None:
            async with self._lock:
                await asyncio.to_thread(self._file.close)
            self._file = None


def _open_for_append(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    return os.fdopen(fd, "a", encoding="utf-8")


def _append(file: IO[str], line: str) -> None:
    file.write(line)
    file.flush()
