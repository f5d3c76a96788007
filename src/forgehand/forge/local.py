"""The embedded local forge: bare git repositories on disk, records in SQLite.

A project is a bare repository, addressed by its absolute path; issues are
`local:PATH#N`. Pushing is a plain `git push PATH BRANCH`. Every SQLite call runs
in a worker thread, every git call as an asyncio subprocess.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from forgehand.forge.base import (
    AccessLevel,
    Comment,
    ForgeKind,
    GitCredentials,
    Issue,
    IssueRef,
    IssueState,
    MergeRequest,
    MergeRequestState,
    NewMergeRequest,
    ProjectRef,
    Reaction,
)
from forgehand.forge.config import LocalConfig
from forgehand.forge.errors import (
    ForgeConfigError,
    ForgeError,
    ForgeNotFoundError,
    ForgeRequestError,
)

T = TypeVar("T")
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS issues (
    repo TEXT NOT NULL, number INTEGER NOT NULL, title TEXT NOT NULL, body TEXT NOT NULL,
    state TEXT NOT NULL, locked INTEGER NOT NULL, author TEXT NOT NULL, labels TEXT NOT NULL,
    created TEXT NOT NULL, PRIMARY KEY (repo, number));
CREATE TABLE IF NOT EXISTS comments (
    id INTEGER PRIMARY KEY AUTOINCREMENT, repo TEXT NOT NULL, issue INTEGER NOT NULL,
    author TEXT NOT NULL, body TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reactions (
    repo TEXT NOT NULL, issue INTEGER NOT NULL, name TEXT NOT NULL, author TEXT NOT NULL,
    PRIMARY KEY (repo, issue, name, author));
CREATE TABLE IF NOT EXISTS merge_requests (
    repo TEXT NOT NULL, number INTEGER NOT NULL, issue INTEGER, source_branch TEXT NOT NULL,
    target_branch TEXT NOT NULL, title TEXT NOT NULL, description TEXT NOT NULL,
    draft INTEGER NOT NULL, state TEXT NOT NULL, created TEXT NOT NULL, updated TEXT NOT NULL,
    PRIMARY KEY (repo, number));
CREATE TABLE IF NOT EXISTS members (
    repo TEXT NOT NULL, username TEXT NOT NULL, access INTEGER NOT NULL,
    PRIMARY KEY (repo, username));
"""
_MR_COLUMNS = "repo, number, issue, source_branch, target_branch, title, description, draft, state"


@dataclass(frozen=True, slots=True)
class LocalMergeRequest:
    """A merge request row as the CLI lists it."""

    repo: str
    number: int
    issue: int | None
    source_branch: str
    target_branch: str
    title: str
    description: str
    draft: bool
    state: MergeRequestState

    def as_merge_request(self) -> MergeRequest:
        return MergeRequest(
            number=self.number,
            source_branch=self.source_branch,
            target_branch=self.target_branch,
            title=self.title,
            description=self.description,
            draft=self.draft,
            state=self.state,
            web_url=f"local:{self.repo}!{self.number}",
        )


class LocalStore:
    """Blocking SQLite access; call it only from worker threads (`LocalStore.run`)."""

    def __init__(self, database: Path) -> None:
        self._database = database
        self._ready = False
        self._lock = threading.Lock()

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in one transaction, in a worker thread."""
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
        self._database.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self._database, isolation_level=None, timeout=30)) as db:
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
                raise ForgeConfigError(
                    f"{self._database} has schema version {row[0]}, newer than this "
                    f"forgehand ({SCHEMA_VERSION}): upgrade forgehand or use another database"
                )
            self._ready = True


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _next_number(db: sqlite3.Connection, table: str, repo: str) -> int:
    query = f"SELECT COALESCE(MAX(number), 0) + 1 FROM {table} WHERE repo = ?"  # noqa: S608
    return int(db.execute(query, (repo,)).fetchone()[0])


def _row_to_mr(row: sqlite3.Row) -> LocalMergeRequest:
    return LocalMergeRequest(
        repo=row["repo"],
        number=row["number"],
        issue=row["issue"],
        source_branch=row["source_branch"],
        target_branch=row["target_branch"],
        title=row["title"],
        description=row["description"],
        draft=bool(row["draft"]),
        state=MergeRequestState(row["state"]),
    )


def _row_to_issue(row: sqlite3.Row) -> Issue:
    return Issue(
        number=row["number"],
        title=row["title"],
        body=row["body"],
        state=IssueState(row["state"]),
        locked=bool(row["locked"]),
        author=row["author"],
        labels=tuple(json.loads(row["labels"])),
        web_url=f"local:{row['repo']}#{row['number']}",
    )


def _row_to_comment(row: sqlite3.Row) -> Comment:
    return Comment(
        id=row["id"],
        author=row["author"],
        body=row["body"],
        created=datetime.fromisoformat(row["created"]),
    )


async def _git(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "git",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        command = " ".join(("git", *args))
        raise ForgeRequestError(f"`{command}` failed: {err.decode(errors='replace').strip()}")
    return out.decode().strip()


async def init_repo(path: Path, default_branch: str = "main") -> Path:
    """Create a bare repository for the local forge (idempotent); return its absolute path."""
    path = await asyncio.to_thread(path.absolute)
    await _git("init", "--quiet", "--bare", f"--initial-branch={default_branch}", str(path))
    return path


async def _default_branch(repo: str) -> str:
    return await _git("--git-dir", repo, "symbolic-ref", "--short", "HEAD")


def _is_bare_repo(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir()


async def _require_repo(path: Path) -> str:
    if not await asyncio.to_thread(_is_bare_repo, path):
        raise ForgeNotFoundError(
            f"{path} is not a bare git repository: create it with "
            f"`git init --bare {path}` (or forgehand.forge.local.init_repo)"
        )
    return str(path)


class LocalForge:
    """One bare repository of the local forge."""

    def __init__(self, config: LocalConfig, project: ProjectRef) -> None:
        if project.kind is not ForgeKind.LOCAL:
            raise ForgeConfigError(f"the local forge cannot serve {project}")
        self._config = config
        self._repo = str(Path(project.path).absolute())
        self._project = ProjectRef(ForgeKind.LOCAL, "", self._repo)
        self._store = LocalStore(config.database)

    @property
    def project(self) -> ProjectRef:
        return self._project

    async def get_issue(self, number: int) -> Issue:
        def fetch(db: sqlite3.Connection) -> Issue:
            return _row_to_issue(self._issue_row(db, number))

        return await self._store.run(fetch)

    async def list_comments(self, number: int) -> list[Comment]:
        def fetch(db: sqlite3.Connection) -> list[Comment]:
            self._issue_row(db, number)
            rows = db.execute(
                "SELECT * FROM comments WHERE repo = ? AND issue = ? ORDER BY id",
                (self._repo, number),
            )
            return [_row_to_comment(row) for row in rows]

        return await self._store.run(fetch)

    async def add_comment(self, number: int, body: str, *, author: str | None = None) -> Comment:
        def insert(db: sqlite3.Connection) -> Comment:
            self._issue_row(db, number)
            cursor = db.execute(
                "INSERT INTO comments (repo, issue, author, body, created) VALUES (?, ?, ?, ?, ?)"
                " RETURNING *",
                (self._repo, number, author or self._config.bot_user, body, _now()),
            )
            return _row_to_comment(cursor.fetchone())

        return await self._store.run(insert)

    async def add_reaction(self, number: int, reaction: Reaction) -> None:
        def insert(db: sqlite3.Connection) -> None:
            self._issue_row(db, number)
            db.execute(
                "INSERT OR IGNORE INTO reactions (repo, issue, name, author) VALUES (?, ?, ?, ?)",
                (self._repo, number, reaction.value, self._config.bot_user),
            )

        await self._store.run(insert)

    async def reactions(self, number: int) -> list[str]:
        """Names of the reactions on an issue (for tests and the CLI)."""

        def fetch(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT name FROM reactions WHERE repo = ? AND issue = ? ORDER BY name",
                (self._repo, number),
            )
            return [str(row["name"]) for row in rows]

        return await self._store.run(fetch)

    async def user_access(self, username: str) -> AccessLevel:
        def fetch(db: sqlite3.Connection) -> AccessLevel:
            row = db.execute(
                "SELECT access FROM members WHERE repo = ? AND username = ?",
                (self._repo, username),
            ).fetchone()
            if row is None:
                return AccessLevel[self._config.default_access.upper()]
            return AccessLevel(row["access"])

        return await self._store.run(fetch)

    async def set_access(self, username: str, level: AccessLevel) -> None:
        """Grant `username` an explicit access level to this repository."""

        def upsert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO members (repo, username, access) VALUES (?, ?, ?)"
                " ON CONFLICT (repo, username) DO UPDATE SET access = excluded.access",
                (self._repo, username, int(level)),
            )

        await self._store.run(upsert)

    async def set_issue_state(
        self, number: int, state: IssueState, *, locked: bool | None = None
    ) -> None:
        """Close or reopen an issue, and lock or unlock it (for the CLI and tests)."""

        def update(db: sqlite3.Connection) -> None:
            current = self._issue_row(db, number)
            lock = bool(current["locked"]) if locked is None else locked
            db.execute(
                "UPDATE issues SET state = ?, locked = ? WHERE repo = ? AND number = ?",
                (state.value, int(lock), self._repo, number),
            )

        await self._store.run(update)

    async def create_issue(
        self,
        title: str,
        body: str = "",
        *,
        author: str | None = None,
        labels: Sequence[str] = (),
    ) -> IssueRef:
        await _require_repo(Path(self._repo))

        def insert(db: sqlite3.Connection) -> int:
            number = _next_number(db, "issues", self._repo)
            db.execute(
                "INSERT INTO issues (repo, number, title, body, state, locked, author, labels,"
                " created) VALUES (?, ?, ?, ?, 'open', 0, ?, ?, ?)",
                (
                    self._repo,
                    number,
                    title,
                    body,
                    author or self._config.bot_user,
                    json.dumps(list(labels)),
                    _now(),
                ),
            )
            return number

        return IssueRef(self._project, await self._store.run(insert))

    async def find_mr_for_branch(self, source_branch: str) -> MergeRequest | None:
        def fetch(db: sqlite3.Connection) -> MergeRequest | None:
            row = db.execute(
                f"SELECT {_MR_COLUMNS} FROM merge_requests WHERE repo = ? AND source_branch = ?"  # noqa: S608
                " AND state = 'open' ORDER BY number LIMIT 1",
                (self._repo, source_branch),
            ).fetchone()
            return None if row is None else _row_to_mr(row).as_merge_request()

        return await self._store.run(fetch)

    async def create_draft_mr(self, new: NewMergeRequest) -> MergeRequest:
        repo = await _require_repo(Path(self._repo))
        target = new.target_branch or await _git(
            "--git-dir", repo, "symbolic-ref", "--short", "HEAD"
        )
        await self._require_branch(new.source_branch)

        def insert(db: sqlite3.Connection) -> MergeRequest:
            if self._open_mr_exists(db, new.source_branch):
                raise ForgeRequestError(
                    f"an open merge request from {new.source_branch!r} already exists: "
                    "update it instead (find_mr_for_branch)",
                    status=409,
                )
            number = _next_number(db, "merge_requests", self._repo)
            db.execute(
                f"INSERT INTO merge_requests ({_MR_COLUMNS}, created, updated)"  # noqa: S608
                " VALUES (?, ?, ?, ?, ?, ?, ?, 1, 'open', ?, ?)",
                (
                    self._repo,
                    number,
                    new.issue,
                    new.source_branch,
                    target,
                    new.title,
                    new.description,
                    _now(),
                    _now(),
                ),
            )
            return self._mr_row(db, number).as_merge_request()

        return await self._store.run(insert)

    async def update_mr(
        self, mr: MergeRequest, *, title: str | None = None, description: str | None = None
    ) -> MergeRequest:
        def update(db: sqlite3.Connection) -> MergeRequest:
            current = self._mr_row(db, mr.number)
            db.execute(
                "UPDATE merge_requests SET title = ?, description = ?, updated = ?"
                " WHERE repo = ? AND number = ?",
                (
                    title if title is not None else current.title,
                    description if description is not None else current.description,
                    _now(),
                    self._repo,
                    mr.number,
                ),
            )
            return self._mr_row(db, mr.number).as_merge_request()

        return await self._store.run(update)

    async def list_merge_requests(self) -> list[LocalMergeRequest]:
        def fetch(db: sqlite3.Connection) -> list[LocalMergeRequest]:
            rows = db.execute(
                f"SELECT {_MR_COLUMNS} FROM merge_requests WHERE repo = ? ORDER BY number",  # noqa: S608
                (self._repo,),
            )
            return [_row_to_mr(row) for row in rows]

        return await self._store.run(fetch)

    async def clone_url(self) -> str:
        return self._repo

    def credentials(self) -> GitCredentials | None:
        return None

    async def aclose(self) -> None:
        return None

    async def _require_branch(self, branch: str) -> None:
        try:
            await _git(
                "--git-dir", self._repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"
            )
        except ForgeError:
            raise ForgeRequestError(
                f"branch {branch!r} does not exist in {self._repo}: push it first "
                f"(git push {self._repo} {branch})",
                status=422,
            ) from None

    def _open_mr_exists(self, db: sqlite3.Connection, branch: str) -> bool:
        row = db.execute(
            "SELECT 1 FROM merge_requests WHERE repo = ? AND source_branch = ? AND state = 'open'",
            (self._repo, branch),
        ).fetchone()
        return row is not None

    def _issue_row(self, db: sqlite3.Connection, number: int) -> sqlite3.Row:
        row: sqlite3.Row | None = db.execute(
            "SELECT * FROM issues WHERE repo = ? AND number = ?", (self._repo, number)
        ).fetchone()
        if row is None:
            raise ForgeNotFoundError(
                f"issue local:{self._repo}#{number} does not exist: list or create issues "
                "with the forgehand CLI"
            )
        return row

    def _mr_row(self, db: sqlite3.Connection, number: int) -> LocalMergeRequest:
        row = db.execute(
            f"SELECT {_MR_COLUMNS} FROM merge_requests WHERE repo = ? AND number = ?",  # noqa: S608
            (self._repo, number),
        ).fetchone()
        if row is None:
            raise ForgeNotFoundError(f"merge request local:{self._repo}!{number} does not exist")
        return _row_to_mr(row)


# CLI-facing helpers: each opens the forge for one repository and does one thing.


async def create_issue(
    config: LocalConfig, repo: Path, title: str, body: str = "", *, author: str | None = None
) -> IssueRef:
    """Create an issue on a local bare repository; `str(result)` is `local:PATH#N`."""
    forge = LocalForge(config, ProjectRef(ForgeKind.LOCAL, "", str(repo)))
    return await forge.create_issue(title, body, author=author)


async def get_issue(config: LocalConfig, ref: IssueRef) -> tuple[Issue, list[Comment]]:
    """An issue and its comments."""
    forge = LocalForge(config, ref.project)
    return await forge.get_issue(ref.number), await forge.list_comments(ref.number)


async def comment(
    config: LocalConfig, ref: IssueRef, body: str, *, author: str | None = None
) -> Comment:
    """Add a comment to a local issue."""
    return await LocalForge(config, ref.project).add_comment(ref.number, body, author=author)


async def list_all_merge_requests(config: LocalConfig) -> list[LocalMergeRequest]:
    """Every merge request of every repository in the local forge's database."""

    def fetch(db: sqlite3.Connection) -> list[LocalMergeRequest]:
        rows = db.execute(f"SELECT {_MR_COLUMNS} FROM merge_requests ORDER BY repo, number")  # noqa: S608
        return [_row_to_mr(row) for row in rows]

    return await LocalStore(config.database).run(fetch)


async def list_merge_requests(config: LocalConfig, repo: Path) -> list[LocalMergeRequest]:
    """Every merge request of a local repository, oldest first."""
    forge = LocalForge(config, ProjectRef(ForgeKind.LOCAL, "", str(repo)))
    return await forge.list_merge_requests()
