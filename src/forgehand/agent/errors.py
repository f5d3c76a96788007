"""Errors raised by the model side of the agent.

No provider SDK exception leaves a provider adapter; each is translated into one of these,
with a message that names the cause and what to do next, and with the API key scrubbed.

    ModelError
    ├── ModelConfigError          bad or missing configuration (no API key, unknown provider)
    ├── ModelAuthError            401/403: the provider rejected the API key
    ├── ModelNotFoundError        404: unknown model, or a base URL that serves no such endpoint
    ├── ModelRequestError         other 4xx: the request itself is wrong (too long, invalid)
    ├── ModelResponseError        the provider answered something we cannot read
    └── ModelRetryableError       transient; retried, raised once retries are exhausted
        ├── ModelRateLimitError   429
        ├── ModelServerError      5xx, 529 (overloaded)
        └── ModelConnectionError  connection refused, reset, DNS
            └── ModelTimeoutError the provider did not answer in time
"""

from __future__ import annotations


class ModelError(Exception):
    """Base class of every error from a model provider adapter."""

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        status: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.status = status
        self.request_id = request_id
        self.attempts = 1

    def __str__(self) -> str:
        return self.message


class ModelConfigError(ModelError):
    """The provider configuration is unusable; fix the configuration file or environment."""


class ModelAuthError(ModelError):
    """The provider rejected the API key (HTTP 401) or its permissions (HTTP 403)."""


class ModelNotFoundError(ModelError):
    """HTTP 404: the model is unknown to the provider, or the base URL is wrong."""


class ModelRequestError(ModelError):
    """The provider refused the request as invalid (HTTP 400, 413, 422, ...)."""


class ModelResponseError(ModelError):
    """The provider's answer could not be read."""


class ModelRetryableError(ModelError):
    """A transient failure: worth another attempt, possibly after `retry_after` seconds."""

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, provider=provider, status=status, request_id=request_id)
        self.retry_after = retry_after

    def __str__(self) -> str:
        if self.attempts > 1:
            return f"{self.message} (gave up after {self.attempts} attempts)"
        return self.message


class ModelRateLimitError(ModelRetryableError):
    """HTTP 429: the account hit a rate limit."""


class ModelServerError(ModelRetryableError):
    """HTTP 5xx or 529: the provider failed or is overloaded."""


class ModelConnectionError(ModelRetryableError):
    """The provider could not be reached."""


class ModelTimeoutError(ModelConnectionError):
    """The provider did not answer within the configured timeout."""
