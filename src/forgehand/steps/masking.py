"""Masking of sensitive values in text and in nested structures.

``Masker`` replaces every occurrence of each secret with ``[MASKED]``. Longer secrets are
replaced first, so a secret that contains another is masked whole. Values of sensitive
inputs that are not strings are masked by their interpolated text form (the form in which
they could appear in a log); booleans are never masked (``true`` would hide every
``true`` in the log without hiding anything).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from forgehand.steps.expressions import stringify
from forgehand.steps.model import Spec

MASK = "[MASKED]"


class Masker:
    """Replaces known secret values with ``[MASKED]``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        unique = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(s) for s in unique)) if unique else None

    @classmethod
    def for_inputs(cls, spec: Spec, inputs: Mapping[str, Any]) -> Masker:
        """A masker for the values of ``spec``'s sensitive inputs."""
        return cls(sensitive_values(spec, inputs))

    def mask_text(self, text: str) -> str:
        """``text`` with every secret replaced."""
        return self._pattern.sub(MASK, text) if self._pattern else text

    def mask(self, value: Any) -> Any:
        """``value`` with secrets replaced in every string, keys included, recursively."""
        if isinstance(value, str):
            return self.mask_text(value)
        if isinstance(value, Mapping):
            return {self.mask(k): self.mask(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.mask(item) for item in value)
        return value


def _leaves(value: Any) -> Iterable[str]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item)
    elif value is not None and not isinstance(value, bool):
        yield stringify(value)


def sensitive_values(
    spec: Spec, inputs: Mapping[str, Any], outputs: Mapping[str, Any] | None = None
) -> list[str]:
    """The texts to mask: ``spec``'s sensitive inputs and (if given) sensitive outputs."""
    secrets: list[str] = []
    sensitive_outputs = [n for n, p in spec.outputs.items() if p.sensitive]
    named = [(name, inputs) for name in spec.sensitive_inputs()]
    named += [(name, outputs or {}) for name in sensitive_outputs]
    for name, values in named:
        value = values.get(name)
        if value is None or isinstance(value, bool):
            continue
        secrets.append(stringify(value))
        if isinstance(value, Mapping | list):
            secrets.extend(_leaves(value))
    return secrets


def mask_sensitive(value: Any, spec: Spec, inputs: Mapping[str, Any]) -> Any:
    """Mask ``spec``'s sensitive input values wherever they occur in ``value``."""
    return Masker.for_inputs(spec, inputs).mask(value)


class StreamMasker:
    """Masks secrets in a byte stream that arrives in chunks.

    A secret may be split across two chunks, so the last ``len(longest secret) - 1``
    bytes of each chunk are held back until the next chunk (or ``flush``) shows whether
    they start a secret. With no secrets, bytes pass through unchanged and undelayed.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        encoded = sorted({s.encode() for s in secrets if s}, key=len, reverse=True)
        self._pattern = re.compile(b"|".join(re.escape(s) for s in encoded)) if encoded else None
        self._keep = max((len(s) for s in encoded), default=1) - 1
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of ``chunk`` (and earlier held bytes) that are safe to emit now."""
        if self._pattern is None:
            return self.flush() + chunk
        data = self._held + chunk
        limit = len(data) - self._keep
        out, cursor = bytearray(), 0
        for match in self._pattern.finditer(data):
            if match.start() >= limit:
                break
            out += data[cursor : match.start()] + MASK.encode()
            cursor = match.end()
        cut = max(cursor, limit)
        out += data[cursor:cut]
        self._held = data[cut:]
        return bytes(out)

    def flush(self) -> bytes:
        """Everything still held, masked."""
        data, self._held = self._held, b""
        if self._pattern is None or not data:
            return data
        return self._pattern.sub(MASK.encode(), data)
