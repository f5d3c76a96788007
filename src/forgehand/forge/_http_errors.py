"""One retry loop and one error mapping shared by the HTTP adapters."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TypeVar

from forgehand.forge.config import RetryConfig
from forgehand.forge.errors import (
    ForgeError,
    ForgeNotFoundError,
    ForgePermissionError,
    ForgeRateLimitError,
    ForgeRequestError,
    ForgeUnavailableError,
)

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


class HttpFailure(Exception):
    """An adapter's SDK failure reduced to what the mapping needs (internal only)."""

    def __init__(
        self,
        status: int | None,
        message: str,
        *,
        retry_after: float | None = None,
        rate_limited: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.rate_limited = rate_limited or status == 429

    @property
    def retryable(self) -> bool:
        return self.status is None or self.rate_limited or self.status in RETRYABLE_STATUSES


@dataclass(frozen=True, slots=True)
class CallContext:
    """Names used in error messages: which forge, which token, which resource."""

    forge: str
    host: str
    token_env: str
    resource: str


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from Retry-After, else from a RateLimit-Reset / X-RateLimit-Reset epoch."""
    lowered = {k.lower(): v for k, v in headers.items()}
    now = time.time() if now is None else now
    if (value := lowered.get("retry-after")) is not None:
        return _parse_retry_after(value, now)
    for name in ("ratelimit-reset", "x-ratelimit-reset"):
        if (value := lowered.get(name)) is not None and value.strip().isdigit():
            return max(0.0, int(value) - now)
    return None


def _parse_retry_after(value: str, now: float) -> float | None:
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None


async def call_with_retries(
    op: Callable[[], Awaitable[T]],
    ctx: CallContext,
    policy: RetryConfig,
    sleep: Sleep = asyncio.sleep,
) -> T:
    """Run `op`, retrying transient failures with backoff; map the final failure."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return await op()
        except HttpFailure as failure:
            delay = _retry_delay(failure, attempt, policy)
            if delay is None:
                raise to_forge_error(failure, ctx, attempt) from None
            log.warning(
                "%s %s: %s; retry %d in %.1fs", ctx.forge, ctx.resource, failure, attempt, delay
            )
            await sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _retry_delay(failure: HttpFailure, attempt: int, policy: RetryConfig) -> float | None:
    if not failure.retryable or attempt >= policy.attempts:
        return None
    backoff = policy.base_delay * 2.0 ** (attempt - 1)
    if failure.retry_after is None:
        return min(backoff, policy.max_delay)
    return failure.retry_after if failure.retry_after <= policy.max_delay else None


def to_forge_error(failure: HttpFailure, ctx: CallContext, attempts: int) -> ForgeError:
    """Translate a failure into forgehand's error, with a message that says what to do."""
    status = failure.status
    where = f"{ctx.resource} on {ctx.host}"
    if status in (401, 403):
        return _permission_error(status, f"{where} ({failure.message})", ctx)
    if status == 404:
        return ForgeNotFoundError(
            f"{where} was not found ({failure.message}): check the reference, "
            f"and that the token in {ctx.token_env} can see the project"
        )
    if failure.rate_limited:
        return ForgeRateLimitError(
            f"{ctx.forge} rate-limited {where} after {attempts} attempt(s): "
            "wait for the limit to reset, or use a token with a higher limit",
            retry_after=failure.retry_after,
        )
    if failure.retryable:
        return _unavailable_error(failure, where, ctx, attempts)
    return ForgeRequestError(
        f"{ctx.forge} refused {where} ({status}: {failure.message})", status=status
    )


def _permission_error(status: int, where: str, ctx: CallContext) -> ForgePermissionError:
    if status == 401:
        advice = f"{ctx.forge} rejected the token in {ctx.token_env} (401) for {where}: "
        advice += f"set {ctx.token_env} to a valid, unexpired token"
    else:
        advice = f"the token in {ctx.token_env} lacks permission (403) for {where}: "
        advice += "give its user access to the project and the token the api/repo scope"
    return ForgePermissionError(advice, status=status)


def _unavailable_error(
    failure: HttpFailure, where: str, ctx: CallContext, attempts: int
) -> ForgeUnavailableError:
    cause = "could not be reached" if failure.status is None else f"answered {failure.status}"
    return ForgeUnavailableError(
        f"{ctx.forge} {cause} for {where} after {attempts} attempt(s) "
        f"({failure.message}): check the forge's status and try again later"
    )
