"""Keeping the conversation inside the model's context: clipped outputs, paging, trimming.

A tool output longer than the limit reaches the model as head + tail with a note on how to
page through the rest (`page_output`); the whole text stays in an `OutputStore`. As the
conversation grows past its token estimate, old tool outputs are cut down to a stub,
oldest first, so a long run never fails on context length.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from forgehand.agent.model import AssistantMessage, Message, ToolResult

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 8
TRIMMED_STUB_CHARS = 300


class OutputStore:
    """Full texts of clipped outputs, by handle (`out-1`, `out-2`, ...)."""

    def __init__(self) -> None:
        self._texts: dict[str, str] = {}
        self._ids = itertools.count(1)

    def put(self, text: str) -> str:
        handle = f"out-{next(self._ids)}"
        self._texts[handle] = text
        return handle

    def page(self, handle: str, offset: int, length: int) -> tuple[str, bool]:
        """(text, is_error): `length` characters of the output from `offset`."""
        text = self._texts.get(handle)
        if text is None:
            known = ", ".join(self._texts) or "none"
            return f"no stored output {handle!r} (stored: {known})", True
        end = min(len(text), offset + length)
        more = f"; next offset {end}" if end < len(text) else "; that is the end"
        return f"{text[offset:end]}\n[characters {offset}-{end} of {len(text)}{more}]", False


def clip(text: str, limit: int, store: OutputStore) -> str:
    """`text` itself if short enough, else head + tail and a note naming the stored whole."""
    if len(text) <= limit:
        return text
    handle = store.put(text)
    head, tail = text[: limit // 2], text[-(limit * 2 // 5) :]
    omitted = len(text) - len(head) - len(tail)
    note = (
        f"\n\n[... {omitted} characters omitted of {len(text)}. Read them with "
        f"page_output(handle={handle!r}, offset={len(head)}); for files, read_file with "
        "start_line and end_line ...]\n\n"
    )
    return head + note + tail


def estimate_tokens(messages: Sequence[Message]) -> int:
    """A rough token count (4 characters a token) of a conversation."""
    chars = 0
    for message in messages:
        chars += len(message.content) if isinstance(message, ToolResult) else len(message.text)
        if isinstance(message, AssistantMessage):
            chars += sum(len(c.arguments_raw) + len(c.name) for c in message.tool_calls)
    return chars // CHARS_PER_TOKEN + MESSAGE_OVERHEAD_TOKENS * len(messages)


def trim_tool_outputs(messages: list[Message], target_tokens: int, *, keep_last: int = 4) -> int:
    """Cut old tool outputs, oldest first, until the estimate is under `target_tokens`.

    The last `keep_last` outputs are spared unless cutting the others is not enough; the
    very last is always spared. Returns how many were cut; changes `messages` in place.
    """
    results = [i for i, m in enumerate(messages) if isinstance(m, ToolResult)]
    estimate, trimmed = estimate_tokens(messages), 0
    for spared in (keep_last, 1):
        for index in results[: max(0, len(results) - spared)]:
            if estimate <= target_tokens:
                return trimmed
            saved = _stub(messages, index)
            estimate -= saved // CHARS_PER_TOKEN
            trimmed += saved > 0
    return trimmed


def _stub(messages: list[Message], index: int) -> int:
    """Replace one tool output by its stub; returns the characters saved."""
    message = messages[index]
    assert isinstance(message, ToolResult)
    if len(message.content) <= TRIMMED_STUB_CHARS + len(_TRIM_NOTE):
        return 0
    stub = message.content[:TRIMMED_STUB_CHARS] + _TRIM_NOTE
    messages[index] = message.model_copy(update={"content": stub})
    return len(message.content) - len(stub)


_TRIM_NOTE = "\n[... older output trimmed to save context; run the tool again if needed]"
