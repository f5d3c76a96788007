"""IssueRef parsing and rendering, configuration, and choosing a forge."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr, TypeAdapter, ValidationError

from forgehand.forge import (
    ForgeConfig,
    ForgeConfigError,
    ForgeKind,
    GitHubConfig,
    GitLabConfig,
    IssueRef,
    IssueRefError,
    LocalConfig,
    ProjectRef,
    config_for,
    open_forge,
)
from forgehand.forge.gitlab import GitLabForge


@pytest.mark.parametrize(
    ("text", "kind", "host", "path", "number"),
    [
        (
            "https://gitlab.example.com/group/sub/project/-/issues/12",
            ForgeKind.GITLAB,
            "https://gitlab.example.com",
            "group/sub/project",
            12,
        ),
        ("https://gitlab.com/g/p/-/issues/3", ForgeKind.GITLAB, "https://gitlab.com", "g/p", 3),
        (
            "https://github.com/octo/widgets/issues/7",
            ForgeKind.GITHUB,
            "https://github.com",
            "octo/widgets",
            7,
        ),
        (
            "https://ghe.corp.example/team/tool/issues/5",
            ForgeKind.GITHUB,
            "https://ghe.corp.example",
            "team/tool",
            5,
        ),
        ("local:/srv/repos/app.git#4", ForgeKind.LOCAL, "", "/srv/repos/app.git", 4),
        ("local:relative/app.git#1", ForgeKind.LOCAL, "", "relative/app.git", 1),
    ],
)
def test_parse_and_render(text: str, kind: ForgeKind, host: str, path: str, number: int) -> None:
    ref = IssueRef.parse(text)
    assert ref == IssueRef(ProjectRef(kind, host, path), number)
    assert str(ref) == text


def test_parse_ignores_fragment_query_and_trailing_slash() -> None:
    ref = IssueRef.parse("https://gitlab.com/g/p/-/issues/3/?x=1#note_9")
    assert str(ref) == "https://gitlab.com/g/p/-/issues/3"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "#12",
        "123",
        "https://gitlab.com/g/p/-/merge_requests/3",
        "https://gitlab.com/p/-/issues/3",
        "https://github.com/octo/widgets/pull/7",
        "https://github.com/octo/issues/7",
        "https://github.com/octo/widgets/issues/0",
        "https://github.com/octo/widgets/issues/x",
        "ftp://gitlab.com/g/p/-/issues/3",
        "local:#3",
        "local:/srv/app.git",
        "local:/srv/app.git#-1",
    ],
)
def test_bad_forms_list_the_accepted_ones(text: str) -> None:
    with pytest.raises(IssueRefError) as caught:
        IssueRef.parse(text)
    message = str(caught.value)
    assert "/-/issues/N" in message
    assert "github.com/OWNER/REPO/issues/N" in message
    assert "local:PATH#N" in message


@given(
    st.lists(st.from_regex(r"[a-z][a-z0-9_.-]{0,8}", fullmatch=True), min_size=2, max_size=4),
    st.integers(min_value=1, max_value=10**9),
)
def test_gitlab_round_trip(segments: list[str], number: int) -> None:
    text = f"https://gl.example/{'/'.join(segments)}/-/issues/{number}"
    assert str(IssueRef.parse(text)) == text


def test_config_is_strict_and_discriminated() -> None:
    adapter: TypeAdapter[ForgeConfig] = TypeAdapter(ForgeConfig)
    assert isinstance(adapter.validate_python({"type": "github"}), GitHubConfig)
    assert isinstance(adapter.validate_python({"type": "local", "database": "x.db"}), LocalConfig)
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "gitlab", "tokn": "typo"})
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "bitbucket"})
    with pytest.raises(ValidationError, match="http"):
        GitLabConfig(url="gitlab.example.com")


def test_token_comes_from_the_environment_and_stays_secret() -> None:
    config = GitLabConfig()
    token = config.resolve_token({"GITLAB_TOKEN": "glpat-secret"})
    assert token.get_secret_value() == "glpat-secret"
    assert "glpat-secret" not in repr(token)
    assert "glpat-secret" not in repr(GitLabConfig(token=SecretStr("glpat-secret")))
    with pytest.raises(ForgeConfigError, match="GITLAB_TOKEN is not set"):
        config.resolve_token({})


def test_open_forge_checks_kind_and_reads_token() -> None:
    project = IssueRef.parse("https://gitlab.example.com/g/p/-/issues/1").project
    forge = open_forge(
        GitLabConfig(url="https://gitlab.example.com"), project, {"GITLAB_TOKEN": "t"}
    )
    assert isinstance(forge, GitLabForge)
    with pytest.raises(ForgeConfigError, match="configured as github"):
        open_forge(GitHubConfig(), project, {"GITHUB_TOKEN": "t"})
    with pytest.raises(ForgeConfigError, match="GITLAB_TOKEN is not set"):
        open_forge(GitLabConfig(), project, {})


def test_config_for_matches_type_and_host() -> None:
    gitlab = GitLabConfig(url="https://gitlab.example.com")
    github = GitHubConfig()
    ghe = GitHubConfig(url="https://ghe.corp.example/api/v3")
    configs: list[ForgeConfig] = [gitlab, github, ghe]
    assert config_for(configs, IssueRef.parse("https://github.com/o/r/issues/1").project) is github
    assert (
        config_for(configs, IssueRef.parse("https://ghe.corp.example/o/r/issues/1").project) is ghe
    )
    assert (
        config_for(configs, IssueRef.parse("https://gitlab.example.com/g/p/-/issues/1").project)
        is gitlab
    )
    with pytest.raises(ForgeConfigError, match="no configured forge serves"):
        config_for(configs, IssueRef.parse("https://gitlab.com/g/p/-/issues/1").project)
