"""The one retry policy of every provider: exponential backoff with jitter, honouring retry-after.

Providers translate failures into `ModelError`s first; this module only sees those, so it
knows nothing of any SDK.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from forgehand.agent.config import RetrySettings
from forgehand.agent.errors import ModelError, ModelRetryableError

log = logging.getLogger(__name__)
T = TypeVar("T")


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, `retry-after` seconds or HTTP date."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        seconds = _as_float(millis)
        if seconds is not None:
            return seconds / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _as_float(value)
    if seconds is not None:
        return seconds
    return _seconds_until(value, time.time() if now is None else now)


def _as_float(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _seconds_until(http_date: str, now: float) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class RetryPolicy:
    """When to try again and how long to wait first."""

    def __init__(self, settings: RetrySettings, *, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def delay(self, attempt: int, error: ModelRetryableError) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        if error.retry_after is not None:
            return min(error.retry_after, self.settings.max_retry_after_s)
        backoff = self.settings.initial_backoff_s * 2.0 ** (attempt - 1)
        capped = min(backoff, self.settings.max_backoff_s)
        return capped * self._rng.uniform(0.5, 1.0)

    async def run(self, attempt_once: Callable[[], Awaitable[T]]) -> tuple[T, int]:
        """Call `attempt_once` until it succeeds or retries run out; returns (result, attempts)."""
        attempt = 1
        while True:
            try:
                return await attempt_once(), attempt
            except ModelError as error:
                error.attempts = attempt
                if not isinstance(error, ModelRetryableError):
                    raise
                if attempt > self.settings.max_retries:
                    raise
                wait = self.delay(attempt, error)
                log.warning("model call failed (%s); retry %d in %.2fs", error, attempt, wait)
                await asyncio.sleep(wait)
                attempt += 1
