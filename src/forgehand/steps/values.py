"""The five value types of step inputs and outputs, and how a value is checked against one."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ValueType(StrEnum):
    """A declared input or output type."""

    STRING = "string"
    NUMBER = "number"
    BOOLEAN = "boolean"
    STRUCT = "struct"
    ARRAY = "array"


TYPE_NAMES = ", ".join(t.value for t in ValueType)


def type_of(value: Any) -> ValueType | None:
    """The step type of a plain value; None for null or a non-JSON value."""
    if isinstance(value, bool):
        return ValueType.BOOLEAN
    if isinstance(value, int | float):
        return ValueType.NUMBER
    if isinstance(value, str):
        return ValueType.STRING
    if isinstance(value, dict):
        return ValueType.STRUCT
    if isinstance(value, list):
        return ValueType.ARRAY
    return None


def matches(value: Any, expected: ValueType) -> bool:
    """Whether ``value`` is of type ``expected``."""
    return type_of(value) is expected


def describe(value: Any) -> str:
    """A short description of a value's type for error messages."""
    found = type_of(value)
    return found.value if found else ("null" if value is None else type(value).__name__)
