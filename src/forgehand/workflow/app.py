"""Wiring for the CLI: the state directory, the sandbox choice, and a `Workflow` for a forge."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from forgehand.forge.base import Forge
from forgehand.forge.config import LocalConfig
from forgehand.workflow.engine import AgentOptions, Workflow, WorkflowOptions
from forgehand.workflow.mirror import MirrorCache
from forgehand.workflow.progress import Progress
from forgehand.workflow.store import SqliteRunStore

AUTO = "auto"
PREFERRED_SANDBOX = "bwrap"


class SandboxChoiceError(Exception):
    """No sandbox is usable and none was waived; the message says what to do."""


@dataclass(frozen=True)
class Home:
    """forgehand's state directory: runs, mirrors, the local forge's database."""

    root: Path

    @classmethod
    def default(cls) -> Home:
        explicit = os.environ.get("FORGEHAND_HOME")
        if explicit:
            return cls(Path(explicit))
        data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return cls(Path(data) / "forgehand")

    @property
    def runs_db(self) -> Path:
        return self.root / "runs.sqlite"

    @property
    def mirrors(self) -> Path:
        return self.root / "mirrors"

    def local_forge(self) -> LocalConfig:
        return LocalConfig(database=self.root / "local-forge.sqlite")

    def store(self) -> SqliteRunStore:
        return SqliteRunStore(self.runs_db)


def choose_sandbox(requested: str) -> str:
    """`auto`: bubblewrap if it works here; a named backend is checked by the workspace."""
    if requested != AUTO:
        return requested
    from forgehand.sandbox.backend import load_backends

    factory = load_backends().get(PREFERRED_SANDBOX)
    if factory is not None:
        status = factory().availability()
        if status.available:
            return PREFERRED_SANDBOX
        detail = status.detail
    else:
        detail = "the bwrap backend is not installed"
    raise SandboxChoiceError(
        f"no sandbox available ({detail}): install bubblewrap (apt-get install bubblewrap), "
        "choose --sandbox gvisor or podman, or pass --sandbox none to run without isolation"
    )


def build_workflow(
    forge: Forge,
    home: Home,
    sandbox: str,
    agent: AgentOptions,
    progress: Progress,
    *,
    root: dict[str, str] | None = None,
    allowed_images: tuple[str, ...] = (),
) -> Workflow:
    options = WorkflowOptions(
        sandbox=sandbox, home=home.root, root=root, allowed_images=allowed_images
    )
    return Workflow(
        home.store(), MirrorCache(home.mirrors), forge, agent, options, progress=progress
    )
