"""Sandbox egress: a host-side allowlisting proxy and the in-sandbox forwarder.

Names are imported lazily so that `python3 -m forgehand.sandbox.egress.forwarder` runs
under the system Python with the standard library only (no pydantic needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forgehand.sandbox.egress.config import DEFAULT_ALLOW, AllowRule, EgressConfig
    from forgehand.sandbox.egress.decisions import Decision
    from forgehand.sandbox.egress.env import proxy_environment
    from forgehand.sandbox.egress.errors import (
        BadRequestError,
        EgressError,
        EgressStartError,
        EgressStateError,
        RequestRefused,
        ResolveError,
    )
    from forgehand.sandbox.egress.proxy import EgressProxy, ProxyState
    from forgehand.sandbox.egress.resolver import Resolver, StaticResolver, SystemResolver

_HOMES = {
    "DEFAULT_ALLOW": "config",
    "AllowRule": "config",
    "EgressConfig": "config",
    "Decision": "decisions",
    "proxy_environment": "env",
    "BadRequestError": "errors",
    "EgressError": "errors",
    "EgressStartError": "errors",
    "EgressStateError": "errors",
    "RequestRefused": "errors",
    "ResolveError": "errors",
    "EgressProxy": "proxy",
    "ProxyState": "proxy",
    "Resolver": "resolver",
    "StaticResolver": "resolver",
    "SystemResolver": "resolver",
}

__all__ = [
    "DEFAULT_ALLOW",
    "AllowRule",
    "BadRequestError",
    "Decision",
    "EgressConfig",
    "EgressError",
    "EgressProxy",
    "EgressStartError",
    "EgressStateError",
    "ProxyState",
    "RequestRefused",
    "ResolveError",
    "Resolver",
    "StaticResolver",
    "SystemResolver",
    "proxy_environment",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
