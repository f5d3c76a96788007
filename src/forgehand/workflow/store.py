"""Where runs are persisted: the `RunStore` seam and its SQLite implementation.

Every phase's output is written when the phase completes, in its own transaction, so a
crashed service finds each run at its last completed phase. `claim` is the one place
that decides, atomically, whether a trigger starts a run, is collapsed into a live one,
or takes over a run whose owner process is gone (and resumes it).

SQLite calls run in worker threads (`asyncio.to_thread`); a PostgreSQL store implements
the same Protocol.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from forgehand.workflow.model import Claim, ClaimKind, Outcome, Phase, RunRecord, RunStatus

T = TypeVar("T")
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, issue TEXT NOT NULL, requester TEXT NOT NULL,
    status TEXT NOT NULL, phase TEXT, outcome TEXT, message TEXT NOT NULL DEFAULT '',
    owner TEXT NOT NULL, created TEXT NOT NULL, updated TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS runs_issue ON runs (issue, status);
CREATE TABLE IF NOT EXISTS phases (
    run_id TEXT NOT NULL REFERENCES runs (run_id), phase TEXT NOT NULL,
    output TEXT NOT NULL, finished TEXT NOT NULL, PRIMARY KEY (run_id, phase));
"""
OwnerAlive = Callable[[str], bool]


class StoreError(Exception):
    """The run store is unusable or the run does not exist; the message says what to do."""


class RunStore(Protocol):
    """Persistent state of runs (SQLite here; PostgreSQL later)."""

    async def claim(self, issue: str, requester: str) -> Claim: ...

    async def get(self, run_id: str) -> RunRecord: ...

    async def list_runs(self, limit: int = 50) -> list[RunRecord]: ...

    async def runs_for_issue(self, issue: str) -> list[RunRecord]: ...

    async def start_phase(self, run_id: str, phase: Phase) -> None: ...

    async def complete_phase(self, run_id: str, phase: Phase, output: dict[str, Any]) -> None: ...

    async def finish(self, run_id: str, outcome: Outcome, message: str) -> None: ...


def this_owner() -> str:
    """Who runs a workflow: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str) -> bool:
    """Whether the owner process still lives (owners on other hosts count as alive)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class SqliteRunStore:
    """`RunStore` in one SQLite file (created with its schema on first use)."""

    def __init__(
        self, path: Path, *, owner: str | None = None, alive: OwnerAlive = owner_alive
    ) -> None:
        self.path = path
        self.owner = owner or this_owner()
        self._alive = alive
        self._ready = False
        self._lock = threading.Lock()

    async def claim(self, issue: str, requester: str) -> Claim:
        kind, run_id = await self._run(lambda db: self._claim(db, issue, requester))
        return Claim(kind, await self.get(run_id))

    async def get(self, run_id: str) -> RunRecord:
        return await self._run(lambda db: self._record(db, run_id))

    async def list_runs(self, limit: int = 50) -> list[RunRecord]:
        def fetch(db: sqlite3.Connection) -> list[RunRecord]:
            rows = db.execute(
                "SELECT run_id FROM runs ORDER BY created DESC, rowid DESC LIMIT ?", (limit,)
            ).fetchall()
            return [self._record(db, row["run_id"]) for row in rows]

        return await self._run(fetch)

    async def runs_for_issue(self, issue: str) -> list[RunRecord]:
        """Every run for `issue`, newest first."""

        def fetch(db: sqlite3.Connection) -> list[RunRecord]:
            rows = db.execute(
                "SELECT run_id FROM runs WHERE issue = ? ORDER BY created DESC, rowid DESC",
                (issue,),
            ).fetchall()
            return [self._record(db, row["run_id"]) for row in rows]

        return await self._run(fetch)

    async def start_phase(self, run_id: str, phase: Phase) -> None:
        await self._update(run_id, "phase = ?", phase.value)

    async def complete_phase(self, run_id: str, phase: Phase, output: dict[str, Any]) -> None:
        text = json.dumps(output, default=str)

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO phases (run_id, phase, output, finished) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (run_id, phase) DO UPDATE SET output = excluded.output,"
                " finished = excluded.finished",
                (run_id, phase.value, text, _now()),
            )
            db.execute("UPDATE runs SET updated = ? WHERE run_id = ?", (_now(), run_id))

        await self._run(write)

    async def finish(self, run_id: str, outcome: Outcome, message: str) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE runs SET status = ?, outcome = ?, message = ?, updated = ?"
                " WHERE run_id = ?",
                (RunStatus.FINISHED.value, outcome.value, message, _now(), run_id),
            )

        await self._run(write)

    # -- plumbing -------------------------------------------------------------------------

    def _claim(self, db: sqlite3.Connection, issue: str, requester: str) -> tuple[ClaimKind, str]:
        row = db.execute(
            "SELECT run_id, owner FROM runs WHERE issue = ? AND status = 'running'"
            " ORDER BY created LIMIT 1",
            (issue,),
        ).fetchone()
        if row is not None and self._alive(row["owner"]):
            return ClaimKind.COLLAPSED, str(row["run_id"])
        if row is not None:
            db.execute(
                "UPDATE runs SET owner = ?, updated = ? WHERE run_id = ?",
                (self.owner, _now(), row["run_id"]),
            )
            return ClaimKind.RESUMED, str(row["run_id"])
        run_id = uuid.uuid4().hex[:12]
        db.execute(
            "INSERT INTO runs (run_id, issue, requester, status, owner, created, updated)"
            " VALUES (?, ?, ?, 'running', ?, ?, ?)",
            (run_id, issue, requester, self.owner, _now(), _now()),
        )
        return ClaimKind.NEW, run_id

    def _record(self, db: sqlite3.Connection, run_id: str) -> RunRecord:
        row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise StoreError(f"no run {run_id!r} in {self.path}: list runs with `forgehand runs`")
        phases = db.execute(
            "SELECT phase, output FROM phases WHERE run_id = ?", (run_id,)
        ).fetchall()
        return RunRecord(
            run_id=row["run_id"],
            issue=row["issue"],
            requester=row["requester"],
            status=RunStatus(row["status"]),
            phase=Phase(row["phase"]) if row["phase"] else None,
            outcome=Outcome(row["outcome"]) if row["outcome"] else None,
            message=row["message"],
            owner=row["owner"],
            created=row["created"],
            updated=row["updated"],
            outputs={Phase(p["phase"]): json.loads(p["output"]) for p in phases},
        )

    async def _update(self, run_id: str, assignment: str, value: str) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(
                f"UPDATE runs SET {assignment}, updated = ? WHERE run_id = ?",  # noqa: S608
                (value, _now(), run_id),
            )

        await self._run(write)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._transaction, fn)

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path, isolation_level=None, timeout=30)) as db:
            db.row_factory = sqlite3.Row
            self._ensure_schema(db)
            yield db

    def _ensure_schema(self, db: sqlite3.Connection) -> None:
        with self._lock:
            if self._ready:
                return
            db.executescript(_SCHEMA)
            row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            if row[0] is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {row[0]}, newer than this forgehand "
                    f"({SCHEMA_VERSION}): upgrade forgehand or use another --home"
                )
            self._ready = True
