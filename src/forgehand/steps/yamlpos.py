"""YAML with source positions: every scalar, list and mapping knows its line and column.

PyYAML's composer already records marks on its nodes; this module turns the node graph
into small immutable ``PScalar`` / ``PSeq`` / ``PMap`` values that keep a ``Position``
(1-based) and rejects what a step file never needs: duplicate keys, non-string keys
and merge keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from forgehand.steps.errors import Position, StepSyntaxError

Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class PScalar:
    """A scalar with its position; ``style`` is PyYAML's (None plain, '"', "'", '|', '>')."""

    value: Scalar
    pos: Position
    style: str | None = None


@dataclass(frozen=True)
class PSeq:
    """A sequence with its position."""

    items: tuple[PNode, ...]
    pos: Position


@dataclass(frozen=True)
class PEntry:
    """One ``key: value`` pair of a mapping."""

    key: str
    key_pos: Position
    value: PNode


@dataclass(frozen=True)
class PMap:
    """A mapping with its position; keys are unique strings, in source order."""

    entries: tuple[PEntry, ...]
    pos: Position

    def get(self, key: str) -> PNode | None:
        """The value for ``key``, or None."""
        entry = self.entry(key)
        return entry.value if entry else None

    def entry(self, key: str) -> PEntry | None:
        """The entry for ``key``, or None."""
        return next((e for e in self.entries if e.key == key), None)

    def keys(self) -> list[str]:
        """Keys in source order."""
        return [e.key for e in self.entries]

    def __iter__(self) -> Iterator[PEntry]:
        return iter(self.entries)


PNode = PScalar | PSeq | PMap


def _position(filename: str, node: yaml.Node) -> Position:
    mark = node.start_mark
    return Position(filename, mark.line + 1, mark.column + 1)


class _Converter:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.constructor = yaml.SafeLoader("")

    def convert(self, node: yaml.Node) -> PNode:
        pos = _position(self.filename, node)
        if isinstance(node, yaml.ScalarNode):
            return PScalar(self._scalar(node, pos), pos, node.style)
        if isinstance(node, yaml.SequenceNode):
            return PSeq(tuple(self.convert(item) for item in node.value), pos)
        if isinstance(node, yaml.MappingNode):
            return PMap(self._entries(node), pos)
        raise StepSyntaxError(f"unsupported YAML node {type(node).__name__}", pos)

    def _scalar(self, node: yaml.ScalarNode, pos: Position) -> Scalar:
        try:
            value: Any = self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise StepSyntaxError(f"invalid scalar: {exc}", pos) from None
        if value is None or isinstance(value, str | int | float | bool):
            return value
        return str(node.value)

    def _entries(self, node: yaml.MappingNode) -> tuple[PEntry, ...]:
        entries: list[PEntry] = []
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key_pos = _position(self.filename, key_node)
            key = self._key(key_node, key_pos)
            if key in seen:
                raise StepSyntaxError(f"duplicate key {key!r}: remove one of them", key_pos)
            seen.add(key)
            entries.append(PEntry(key, key_pos, self.convert(value_node)))
        return tuple(entries)

    def _key(self, node: yaml.Node, pos: Position) -> str:
        if node.tag == "tag:yaml.org,2002:merge":
            raise StepSyntaxError("YAML merge keys (<<) are not supported in step files", pos)
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str":
            raise StepSyntaxError("mapping keys must be strings", pos)
        return str(node.value)


def compose_documents(text: str, filename: str) -> list[PNode | None]:
    """Parse every YAML document in ``text``; an empty document is None."""
    converter = _Converter(filename)
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = (
            Position(filename, mark.line + 1, mark.column + 1) if mark else Position(filename, 1, 1)
        )
        raise StepSyntaxError(f"invalid YAML: {exc.problem or exc.context}", pos) from None
    except yaml.YAMLError as exc:
        raise StepSyntaxError(f"invalid YAML: {exc}", Position(filename, 1, 1)) from None
    return [converter.convert(node) if node is not None else None for node in nodes]


def to_plain(node: PNode | None) -> Any:
    """The plain Python value of a positioned node."""
    if node is None:
        return None
    if isinstance(node, PScalar):
        return node.value
    if isinstance(node, PSeq):
        return [to_plain(item) for item in node.items]
    return {entry.key: to_plain(entry.value) for entry in node.entries}


def walk_strings(node: PNode | None) -> Iterator[PScalar]:
    """Every string scalar inside ``node``, depth first."""
    if isinstance(node, PScalar):
        if isinstance(node.value, str):
            yield node
    elif isinstance(node, PSeq):
        for item in node.items:
            yield from walk_strings(item)
    elif isinstance(node, PMap):
        for entry in node.entries:
            yield from walk_strings(entry.value)
