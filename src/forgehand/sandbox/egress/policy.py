"""The proxy's rules: read-only mode, the allowlist, and the address check.

Everything here is synchronous and pure; refusals are raised as RequestRefused.
"""

from __future__ import annotations

from http import HTTPStatus

from forgehand.sandbox.egress.addresses import IPAddress, first_blocked
from forgehand.sandbox.egress.config import AllowRule, EgressConfig, is_ip_literal
from forgehand.sandbox.egress.errors import RequestRefused
from forgehand.sandbox.egress.httpwire import Target

READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
READ_ONLY_REFUSAL = "the network is read-only"
"""How the reason of every read-only refusal begins (callers tell them apart by it)."""
_NEVER = (
    "The proxy never connects to private, loopback, link-local, multicast, reserved or "
    "metadata addresses; an operator can trust an internal mirror's network "
    "(`trusted_networks`), nothing else allows it."
)


def _deny(reason: str, remedy: str, rule: AllowRule | None = None) -> RequestRefused:
    return RequestRefused(
        HTTPStatus.FORBIDDEN, "denied", reason, remedy, rule=str(rule) if rule else None
    )


def check_method(config: EgressConfig, method: str) -> None:
    """Refuse what read-only mode forbids: CONNECT and every method but GET, HEAD, OPTIONS."""
    if not config.read_only or method in READ_ONLY_METHODS:
        return
    if method == "CONNECT":
        reason = f"{READ_ONLY_REFUSAL} and CONNECT (https) is refused in read-only mode"
        remedy = "Methods inside TLS cannot be seen, so use plain http:// or turn read-only off."
    else:
        reason = f"{READ_ONLY_REFUSAL} and {method} is not GET, HEAD or OPTIONS"
        remedy = "Only GET, HEAD and OPTIONS are allowed; turn read-only mode off to send more."
    raise _deny(reason, remedy)


def match_rule(config: EgressConfig, target: Target) -> AllowRule:
    """The first allowlist rule that allows `target`; refuses when none does."""
    for rule in config.allow:
        if rule.matches(target.host, target.port):
            return rule
    hint = f"To allow it, {config.allow_hint}."
    for rule in config.allow:
        if rule.matches(target.host, rule.ports[0] if rule.ports else target.port):
            reason = f"port {target.port} is not allowed for {target.host} (rule {rule})"
            raise _deny(reason, f"Use an allowed port or, {config.allow_hint}.", rule)
    kind = "literal IP address" if is_ip_literal(target.host) else "host"
    raise _deny(f"{kind} {target.host} is not on the allowlist", hint)


def check_addresses(
    config: EgressConfig, target: Target, rule: AllowRule, addresses: list[IPAddress]
) -> None:
    """Refuse when any address `target` resolved to is not a public unicast address."""
    blocked = first_blocked(
        addresses,
        allow_loopback=config.allow_loopback_for_tests,
        trusted=config.trusted_networks,
    )
    if blocked is None:
        return
    address, why = blocked
    refusal = _deny(f"{target.host} resolves to {address}, {why}", _NEVER, rule)
    refusal.address = str(address)
    raise refusal
