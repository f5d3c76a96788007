"""Helpers every provider adapter shares: error translation, redaction, tool argument parsing."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from forgehand.agent.errors import (
    ModelAuthError,
    ModelConnectionError,
    ModelError,
    ModelNotFoundError,
    ModelRateLimitError,
    ModelRequestError,
    ModelServerError,
    ModelTimeoutError,
)
from forgehand.agent.retry import parse_retry_after

_KEY_PATTERN = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{6,}|Bearer\s+\S+)")
_RETRYABLE_4XX = frozenset({408, 409, 429})
_MAX_DETAIL = 500


@dataclass(frozen=True)
class ErrorContext:
    """What an adapter knows when it explains a failure; `secrets` are scrubbed from messages."""

    provider: str
    model: str
    base_url: str
    endpoint: str
    key_env: str
    secrets: tuple[str, ...] = ()

    def redact(self, text: str) -> str:
        """`text` with every known secret and anything shaped like an API key removed."""
        for secret in self.secrets:
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return _KEY_PATTERN.sub("***", text)


def status_error(
    ctx: ErrorContext, status: int, body: object, headers: Mapping[str, str]
) -> ModelError:
    """Translate an HTTP error answer into forgehand's error tree."""
    detail = ctx.redact(error_detail(body))[:_MAX_DETAIL]
    request_id = headers.get("request-id") or headers.get("x-request-id")
    where = f"{ctx.provider} at {ctx.base_url}"
    if status in (401, 403):
        what = "rejected the API key" if status == 401 else "refused the API key's permissions"
        return ModelAuthError(
            f"the provider {what} (HTTP {status} from {where}): set {ctx.key_env} or `api_key` "
            f"in forgehand's configuration file to a valid key; provider said: {detail}",
            provider=ctx.provider,
            status=status,
            request_id=request_id,
        )
    if status == 404:
        return ModelNotFoundError(
            f"unknown model {ctx.model!r} (HTTP 404 from {where}): check `model` in the "
            f"configuration, and that base_url serves {ctx.endpoint}; provider said: {detail}",
            provider=ctx.provider,
            status=status,
            request_id=request_id,
        )
    if status in _RETRYABLE_4XX or status >= 500:
        return _retryable(ctx, status, detail, headers, request_id)
    return ModelRequestError(
        f"{where} refused the request (HTTP {status}): {detail}",
        provider=ctx.provider,
        status=status,
        request_id=request_id,
    )


def _retryable(
    ctx: ErrorContext,
    status: int,
    detail: str,
    headers: Mapping[str, str],
    request_id: str | None,
) -> ModelError:
    cls = ModelRateLimitError if status == 429 else ModelServerError
    hint = "lower concurrency or raise the account's rate limits" if status == 429 else "try later"
    return cls(
        f"{ctx.provider} at {ctx.base_url} answered HTTP {status}: {detail}; {hint}",
        provider=ctx.provider,
        status=status,
        request_id=request_id,
        retry_after=parse_retry_after(headers),
    )


def connection_error(
    ctx: ErrorContext, cause: BaseException | None, *, timeout: bool
) -> ModelError:
    """Translate a transport failure."""
    if timeout:
        return ModelTimeoutError(
            f"{ctx.provider} at {ctx.base_url} did not answer in time: raise timeout_s in the "
            "configuration or ask for fewer max_tokens",
            provider=ctx.provider,
        )
    reason = ctx.redact(str(cause)) if cause is not None else "connection failed"
    return ModelConnectionError(
        f"cannot reach {ctx.provider} at {ctx.base_url} ({reason}): check base_url and that "
        "the host can reach it",
        provider=ctx.provider,
    )


def error_detail(body: object) -> str:
    """The human-readable message inside an error body of either wire format."""
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(body.get("message"), str):
            return str(body["message"])
        return json.dumps(body)[:_MAX_DETAIL]
    if isinstance(body, str) and body:
        return body
    return "no details"


def parse_arguments(raw: str) -> tuple[dict[str, Any] | None, str | None]:
    """Parse tool-call arguments; a bad value is reported, never raised."""
    if not raw.strip():
        return {}, None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, (
            f"the arguments are not valid JSON ({exc.msg} at line {exc.lineno} column "
            f"{exc.colno}); call the tool again with a JSON object that matches its schema"
        )
    if not isinstance(value, dict):
        kind = type(value).__name__
        return None, f"the arguments must be a JSON object, not {kind}; call the tool again"
    return value, None
