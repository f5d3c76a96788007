"""Errors raised by the forge layer.

Every adapter translates its SDK's exceptions into this tree; nothing from
python-gitlab, githubkit, requests or httpx escapes a forge::

    ForgeError
    ├── ForgeConfigError        bad or incomplete configuration (missing token, wrong type)
    ├── IssueRefError           an issue reference in none of the accepted forms
    ├── ForgePermissionError    401/403: the token is invalid or lacks a permission
    ├── ForgeNotFoundError      404: project, issue, user or merge request does not exist
    ├── ForgeRequestError       any other rejected request (409, 422, a failed git command)
    └── ForgeUnavailableError   5xx or network failure that outlived the retries
        └── ForgeRateLimitError 429 / exhausted rate limit that outlived the retries
"""

from __future__ import annotations


class ForgeError(Exception):
    """Base class of every error the forge layer raises."""


class ForgeConfigError(ForgeError):
    """The forge configuration is incomplete or does not fit the requested project."""


class IssueRefError(ForgeError, ValueError):
    """Text that is not an issue reference in any accepted form."""


class ForgePermissionError(ForgeError):
    """The forge rejected the token (401) or the token lacks a permission (403)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class ForgeNotFoundError(ForgeError):
    """The named resource does not exist, or the token cannot see it."""


class ForgeRequestError(ForgeError):
    """The forge refused a request for a reason other than permissions or existence."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ForgeUnavailableError(ForgeError):
    """The forge kept failing (5xx, network) after every retry."""


class ForgeRateLimitError(ForgeUnavailableError):
    """The forge kept rate-limiting the token after every retry."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
