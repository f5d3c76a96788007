"""The trajectory of a run: one JSON object a line, appended and flushed as things happen.

Kinds of record: `run_start` (model, budgets, tools, system prompt, task), `model_call`
(the messages added since the previous call, the answer, tokens, cost, latency, totals),
`tool_call` (arguments, the text the model got, exit code, handle, duration),
`context_trimmed`, `run_end` (reason, summary, totals). Every string passes the steps
`Masker` first, so no configured secret (the provider key above all) is ever written.
An observer (the CLI's progress line) sees the same masked records.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from forgehand.steps.masking import Masker

Observer = Callable[[dict[str, Any]], None]


class Trajectory:
    """Appends masked records to a JSONL file (if given) and shows them to an observer."""

    def __init__(
        self,
        path: Path | None,
        masker: Masker,
        observer: Observer | None = None,
    ) -> None:
        self.path = path
        self.masker = masker
        self.observer = observer
        self._file: IO[str] | None = None
        self._started = time.monotonic()

    async def open(self) -> None:
        if self.path is not None and self._file is None:
            self._file = await asyncio.to_thread(_open_append, self.path)

    async def close(self) -> None:
        if self._file is not None:
            await asyncio.to_thread(self._file.close)
            self._file = None

    async def record(self, kind: str, **fields: Any) -> None:
        """Mask, write one line, flush; then tell the observer."""
        event = {
            "type": kind,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "elapsed_s": round(time.monotonic() - self._started, 3),
            **fields,
        }
        masked: dict[str, Any] = self.masker.mask(_plain(event))
        if self._file is not None:
            await asyncio.to_thread(_write_line, self._file, json.dumps(masked))
        if self.observer is not None:
            self.observer(masked)


def _open_append(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8")


def _write_line(file: IO[str], line: str) -> None:
    file.write(line + "\n")
    file.flush()


def _plain(value: Any) -> Any:
    """JSON-able form: tuples become lists, everything unknown becomes its str()."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def read_trajectory(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a trajectory file; a torn last line (a crash mid-write) is skipped."""
    with path.open(encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record
