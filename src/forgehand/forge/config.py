"""Typed, strict configuration for each forge; tokens come from the environment at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from forgehand.forge.errors import ForgeConfigError

AccessName = Literal["none", "read", "write", "maintain", "admin"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryConfig(_Strict):
    """How transient failures (429, 5xx, network) are retried."""

    attempts: int = Field(default=4, ge=1, le=10, description="Tries in total, first included.")
    base_delay: float = Field(default=0.5, ge=0, description="Seconds before the first retry.")
    max_delay: float = Field(
        default=60.0, gt=0, description="Longest wait; a longer Retry-After fails at once."
    )


class _RemoteForgeConfig(_Strict):
    url: str
    token: SecretStr | None = Field(
        default=None, description="Explicit token; normally unset and read from `token_env`."
    )
    token_env: str
    timeout: float = Field(default=30.0, gt=0, description="Seconds per HTTP request.")
    retry: RetryConfig = RetryConfig()

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {value!r}")
        return value.rstrip("/")

    def resolve_token(self, env: Mapping[str, str]) -> SecretStr:
        """The token, read once at start-up from `token` or the `token_env` variable."""
        if self.token is not None:
            return self.token
        value = env.get(self.token_env, "").strip()
        if not value:
            raise ForgeConfigError(
                f"{self.token_env} is not set: export a token for {self.url} "
                f"in {self.token_env}, or set token_env to the variable that holds it"
            )
        return SecretStr(value)


class GitLabConfig(_RemoteForgeConfig):
    """A GitLab instance reached through its REST API v4."""

    type: Literal["gitlab"] = "gitlab"
    url: str = Field(default="https://gitlab.com", description="Base URL, without /api/v4.")
    token_env: str = Field(default="GITLAB_TOKEN", description="Variable holding the token.")


class GitHubConfig(_RemoteForgeConfig):
    """GitHub or GitHub Enterprise reached through its REST API."""

    type: Literal["github"] = "github"
    url: str = Field(
        default="https://api.github.com",
        description="API base URL; https://HOST/api/v3 for GitHub Enterprise Server.",
    )
    token_env: str = Field(default="GITHUB_TOKEN", description="Variable holding the token.")


class LocalConfig(_Strict):
    """The embedded forge: bare repositories on disk, records in SQLite."""

    type: Literal["local"] = "local"
    database: Path = Field(description="SQLite file; created with its schema on first use.")
    bot_user: str = Field(default="forgehand", description="Author of the bot's comments.")
    default_access: AccessName = Field(
        default="admin", description="Access of users with no explicit grant."
    )


ForgeConfig = Annotated[GitLabConfig | GitHubConfig | LocalConfig, Field(discriminator="type")]
