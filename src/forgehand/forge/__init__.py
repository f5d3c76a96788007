"""Forges: GitLab, GitHub and the embedded local forge behind one `Forge` protocol.

forge = open_forge(config, IssueRef.parse(text).project)   # reads the token once
try:
    issue = await forge.get_issue(ref.number)
finally:
    await forge.aclose()
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urlsplit

from forgehand.forge.base import (
    AccessLevel,
    Comment,
    Forge,
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
from forgehand.forge.config import ForgeConfig, GitHubConfig, GitLabConfig, LocalConfig
from forgehand.forge.errors import (
    ForgeConfigError,
    ForgeError,
    ForgeNotFoundError,
    ForgePermissionError,
    ForgeRateLimitError,
    ForgeRequestError,
    ForgeUnavailableError,
    IssueRefError,
)

__all__ = [
    "AccessLevel",
    "Comment",
    "Forge",
    "ForgeConfig",
    "ForgeConfigError",
    "ForgeError",
    "ForgeKind",
    "ForgeNotFoundError",
    "ForgePermissionError",
    "ForgeRateLimitError",
    "ForgeRequestError",
    "ForgeUnavailableError",
    "GitCredentials",
    "GitHubConfig",
    "GitLabConfig",
    "Issue",
    "IssueRef",
    "IssueRefError",
    "IssueState",
    "LocalConfig",
    "MergeRequest",
    "MergeRequestState",
    "NewMergeRequest",
    "ProjectRef",
    "Reaction",
    "config_for",
    "open_forge",
]


def _open_gitlab(config: ForgeConfig, project: ProjectRef, env: Mapping[str, str]) -> Forge:
    from forgehand.forge.gitlab import GitLabForge

    assert isinstance(config, GitLabConfig)
    return GitLabForge(config, project, config.resolve_token(env))


def _open_github(config: ForgeConfig, project: ProjectRef, env: Mapping[str, str]) -> Forge:
    from forgehand.forge.github import GitHubForge

    assert isinstance(config, GitHubConfig)
    return GitHubForge(config, project, config.resolve_token(env))


def _open_local(config: ForgeConfig, project: ProjectRef, env: Mapping[str, str]) -> Forge:
    from forgehand.forge.local import LocalForge

    assert isinstance(config, LocalConfig)
    return LocalForge(config, project)


_OPENERS: dict[str, Callable[[ForgeConfig, ProjectRef, Mapping[str, str]], Forge]] = {
    ForgeKind.GITLAB: _open_gitlab,
    ForgeKind.GITHUB: _open_github,
    ForgeKind.LOCAL: _open_local,
}


def open_forge(
    config: ForgeConfig, project: ProjectRef, env: Mapping[str, str] | None = None
) -> Forge:
    """A forge bound to `project`; the token is read from `env` (default: os.environ) now."""
    if project.kind != config.type:
        raise ForgeConfigError(
            f"{project} is a {project.kind} project but the forge is configured as "
            f"{config.type}: add a {project.kind} forge to the configuration"
        )
    return _OPENERS[config.type](config, project, os.environ if env is None else env)


def _web_host(config: GitLabConfig | GitHubConfig) -> str:
    host = urlsplit(config.url).netloc
    return "github.com" if host == "api.github.com" else host


def config_for(configs: Sequence[ForgeConfig], project: ProjectRef) -> ForgeConfig:
    """The configured forge that serves `project` (same type, and same host for remotes)."""
    for config in configs:
        if config.type != project.kind:
            continue
        if isinstance(config, LocalConfig) or _web_host(config) == urlsplit(project.host).netloc:
            return config
    raise ForgeConfigError(
        f"no configured forge serves {project}: add a {project.kind} forge for "
        f"{project.host or 'local repositories'} to the configuration"
    )
