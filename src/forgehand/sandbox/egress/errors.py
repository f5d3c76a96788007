"""Errors raised by the egress proxy.

```
EgressError                      base class; every error this package raises
├── EgressStartError             the proxy could not start (socket, log file)
├── EgressStateError             a lifecycle method was called in the wrong state
├── ResolveError                 a host name did not resolve to any address
├── BadRequestError              a client sent a malformed or oversized request (answered 400)
└── RequestRefused               a request was denied (403), rejected (400/503) or failed (502)
```
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Literal

Verdict = Literal["allowed", "denied", "failed", "rejected"]
"""Outcome of one request: see Decision.decision."""


class EgressError(Exception):
    """Base class of every error raised by forgehand.sandbox.egress."""


class EgressStartError(EgressError):
    """The proxy could not start: its socket or decision log could not be created."""


class EgressStateError(EgressError):
    """A lifecycle method was called in a state that does not allow it."""


class ResolveError(EgressError):
    """A host name did not resolve to any address."""


class BadRequestError(EgressError):
    """A client request was malformed or too large; the proxy answers 400."""


class RequestRefused(EgressError):
    """The proxy refused a request; carries what the client is told and what is logged."""

    def __init__(
        self,
        status: HTTPStatus,
        verdict: Verdict,
        reason: str,
        remedy: str,
        *,
        rule: str | None = None,
        address: str | None = None,
    ) -> None:
        super().__init__(f"{reason}. {remedy}")
        self.status = status
        self.verdict = verdict
        self.reason = reason
        self.remedy = remedy
        self.rule = rule
        self.address = address
