"""Errors of the step language, every one with the source position it is about.

Exception tree::

    StepError                       any problem with a step file or a step invocation
    ├── StepSyntaxError             the file is not valid YAML, or not two documents
    ├── SchemaError                 a key is unknown, missing or has the wrong shape
    ├── ExpressionError             a ``${{ }}`` expression cannot be parsed
    ├── ExpressionEvaluationError   an expression names something absent at run time
    ├── UnknownNameError            static check: unknown input, step or output
    ├── StepTypeError               a value does not match its declared type
    ├── StepReferenceError          a ``step:`` reference cannot be resolved
    │   ├── UnsupportedReferenceError   e.g. OCI references
    │   ├── ReferenceCycleError         a -> b -> a
    │   └── FetchError                  git could not fetch the reference
    ├── OutputProtocolError         an output or export file line is invalid
    └── BuiltinError                a built-in step refused or failed; ``code`` says how

``Diagnostic`` is the rendered, non-exception form used by the checker API.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Position:
    """A 1-based line and column in a file."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    def shifted(self, lines: int, col: int) -> Position:
        """The position ``lines`` lines below; ``col`` is absolute when lines > 0."""
        if lines == 0:
            return Position(self.file, self.line, self.col + col)
        return Position(self.file, self.line + lines, col + 1)


UNKNOWN_POSITION = Position("<unknown>", 0, 0)


@dataclass(frozen=True, order=True)
class Diagnostic:
    """One problem found by the checker; renders as ``file:line:col: message``."""

    position: Position
    message: str

    def __str__(self) -> str:
        return f"{self.position}: {self.message}"


class StepError(Exception):
    """Base class of every step-language error; carries a position and a message."""

    def __init__(self, message: str, position: Position = UNKNOWN_POSITION) -> None:
        super().__init__(message)
        self.message = message
        self.position = position

    def __str__(self) -> str:
        return f"{self.position}: {self.message}"

    def diagnostic(self) -> Diagnostic:
        """This error as a checker diagnostic."""
        return Diagnostic(self.position, self.message)


class StepSyntaxError(StepError):
    """The file is not valid YAML or does not have the two documents a step needs."""


class SchemaError(StepError):
    """A key is unknown, required but missing, or its value has the wrong shape."""


class ExpressionError(StepError):
    """A ``${{ }}`` expression is malformed."""


class ExpressionEvaluationError(ExpressionError):
    """An expression names a value that does not exist in the evaluation context."""


class UnknownNameError(StepError):
    """Static check: an expression or key names an unknown input, step or output."""


class StepTypeError(StepError):
    """A value does not match the type its spec declares."""


class StepReferenceError(StepError):
    """A step reference cannot be resolved."""


class UnsupportedReferenceError(StepReferenceError):
    """A reference of a kind forgehand does not support (yet)."""


class ReferenceCycleError(StepReferenceError):
    """Step references form a cycle; ``cycle`` lists the files in order."""

    def __init__(self, cycle: list[str], position: Position) -> None:
        super().__init__(
            "step reference cycle: " + " -> ".join(cycle) + "; break the cycle", position
        )
        self.cycle = cycle


class FetchError(StepReferenceError):
    """A remote step could not be fetched."""


class OutputProtocolError(StepError):
    """A line of an output or export file is not valid."""


class BuiltinError(StepError):
    """A built-in step refused its inputs or failed.

    ``code`` is one of ``invalid_argument``, ``not_found``, ``permission_denied``,
    ``failed_precondition``, ``command_failed``, ``timeout``. ``exit_code`` and
    ``outputs`` are set when a command ran (``run``, ``exec``) and failed.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        exit_code: int | None = None,
        outputs: dict[str, object] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.exit_code = exit_code
        self.outputs = outputs or {}

    def __str__(self) -> str:
        return self.message
