"""``${{ }}`` expressions: a tiny, safe language (no ``eval``) over a step's context.

Grammar of the text between ``${{`` and ``}}``::

    expr     = literal | path
    literal  = "true" | "false" | "null" | number | string      (strings: '..' or "..")
    path     = ident { "." ident | "[" ( int | string ) "]" }
    ident    = [A-Za-z_][A-Za-z0-9_]*

Roots of a path: ``inputs``, ``env``, ``steps`` (``steps.NAME.outputs.OUT``),
``step_dir`` / ``func_dir``, ``work_dir``, ``output_file``, ``export_file``.

A value that is exactly one expression (``"${{ inputs.count }}"``) evaluates to the typed
value; an expression embedded in a longer string is interpolated: strings as they are,
booleans as ``true``/``false``, numbers in their shortest form, structs and arrays as
compact JSON, null as the empty string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from forgehand.steps.errors import ExpressionError, ExpressionEvaluationError, Position
from forgehand.steps.yamlpos import PScalar

OPEN = "${{"
CLOSE = "}}"
ROOTS = frozenset(
    {"inputs", "env", "steps", "step_dir", "func_dir", "work_dir", "output_file", "export_file"}
)
STRING_ROOTS = frozenset({"step_dir", "func_dir", "work_dir", "output_file", "export_file"})

Segment = str | int

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
      | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<punct>[.\[\]])
    )""",
    re.VERBOSE,
)
_LITERAL_WORDS: dict[str, Any] = {"true": True, "false": False, "null": None}


@dataclass(frozen=True)
class Literal:
    """A constant."""

    value: Any


@dataclass(frozen=True)
class Path:
    """``root.seg[0].seg``: a lookup in the evaluation context."""

    root: str
    segments: tuple[Segment, ...] = ()

    def __str__(self) -> str:
        text = self.root
        for seg in self.segments:
            text += f"[{seg}]" if isinstance(seg, int) else f".{seg}"
        return text


Expr = Literal | Path


@dataclass(frozen=True)
class TemplateExpr:
    """One ``${{ }}`` occurrence: its parsed expression, source text and position."""

    expr: Expr
    source: str
    pos: Position


@dataclass(frozen=True)
class Template:
    """A string split into literal text and expressions."""

    parts: tuple[str | TemplateExpr, ...]

    @property
    def expressions(self) -> list[TemplateExpr]:
        """The expressions, in order."""
        return [p for p in self.parts if isinstance(p, TemplateExpr)]

    @property
    def whole(self) -> TemplateExpr | None:
        """The expression if the string is exactly one expression (typed result)."""
        if len(self.parts) == 1 and isinstance(self.parts[0], TemplateExpr):
            return self.parts[0]
        return None


@dataclass(frozen=True)
class ExprContext:
    """What expressions can see while a step runs."""

    inputs: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    steps: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    step_dir: str | None = None
    work_dir: str | None = None
    output_file: str | None = None
    export_file: str | None = None

    def root(self, name: str) -> Any:
        """The value of a root name; None when the context does not provide it."""
        if name == "steps":
            return {step: {"outputs": outs} for step, outs in self.steps.items()}
        if name == "func_dir":
            return self.step_dir
        return getattr(self, name)


class _Parser:
    def __init__(self, text: str, pos: Position) -> None:
        self.text = text
        self.pos = pos
        self.tokens = self._tokenize()
        self.index = 0

    def _fail(self, message: str) -> ExpressionError:
        return ExpressionError(f"{message} in expression {self.text.strip()!r}", self.pos)

    def _tokenize(self) -> list[tuple[str, str]]:
        tokens: list[tuple[str, str]] = []
        offset = 0
        stripped = self.text.rstrip()
        while offset < len(stripped):
            match = _TOKEN.match(stripped, offset)
            if match is None or match.end() == offset:
                rest = stripped[offset:].strip()
                raise self._fail(f"unexpected character {rest[:1]!r}")
            kind = match.lastgroup or ""
            tokens.append((kind, match.group(kind)))
            offset = match.end()
        return tokens

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def _next(self, what: str) -> tuple[str, str]:
        token = self._peek()
        if token is None:
            raise self._fail(f"expected {what} but the expression ended")
        self.index += 1
        return token

    def parse(self) -> Expr:
        if not self.tokens:
            raise self._fail("empty expression: write a name such as inputs.NAME")
        expr = self._primary()
        if self._peek() is not None:
            raise self._fail(f"unexpected {self._peek()[1]!r}")  # type: ignore[index]
        return expr

    def _primary(self) -> Expr:
        kind, text = self._next("a name or a literal")
        if kind == "number":
            return Literal(self._number(text))
        if kind == "string":
            return Literal(_unquote(text, self))
        if kind == "ident" and text in _LITERAL_WORDS:
            return Literal(_LITERAL_WORDS[text])
        if kind == "ident":
            return self._path(text)
        raise self._fail(f"unexpected {text!r}")

    def _number(self, text: str) -> int | float:
        try:
            return float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise self._fail(f"number {text[:20]}... is too long") from None

    def _path(self, root: str) -> Path:
        if root not in ROOTS:
            known = ", ".join(sorted(ROOTS))
            raise self._fail(f"unknown name {root!r} (known: {known})")
        segments: list[Segment] = []
        while (token := self._peek()) is not None:
            self.index += 1
            segments.append(self._dot() if token[1] == "." else self._index(token))
        return Path(root, tuple(segments))

    def _dot(self) -> str:
        kind, text = self._next("a name after '.'")
        if kind != "ident":
            raise self._fail(f"expected a name after '.', found {text!r}")
        return text

    def _index(self, token: tuple[str, str]) -> Segment:
        if token[1] != "[":
            raise self._fail(f"unexpected {token[1]!r}")
        kind, text = self._next("an index")
        segment: Segment
        if kind == "number" and text.isdigit():
            segment = int(self._number(text))
        elif kind == "string":
            segment = _unquote(text, self)
        else:
            raise self._fail(f"an index must be a non-negative integer or a string, not {text!r}")
        if self._next("']'")[1] != "]":
            raise self._fail("expected ']'")
        return segment


def _unquote(text: str, parser: _Parser) -> str:
    if text[0] == "'":
        return text[1:-1].replace("\\'", "'").replace("\\\\", "\\")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise parser._fail(f"invalid string literal {text}") from None
    return str(value)


def parse_expression(text: str, pos: Position) -> Expr:
    """Parse the text between ``${{`` and ``}}``."""
    return _Parser(text, pos).parse()


def _find_close(text: str, start: int) -> int:
    quote = ""
    index = start
    while index < len(text):
        char = text[index]
        if quote:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif text.startswith(CLOSE, index):
            return index
        index += 1
    return -1


def _offset_pos(base: Position, text: str, offset: int, style: str | None) -> Position:
    before = text[:offset]
    newlines = before.count("\n")
    quoted = 1 if style in {'"', "'"} else 0
    if style in {"|", ">"}:
        return base.shifted(newlines + 1, len(before) - before.rfind("\n") - 1)
    if newlines == 0:
        return base.shifted(0, quoted + offset)
    return base.shifted(newlines, len(before) - before.rfind("\n") - 1)


def parse_template(text: str, pos: Position, style: str | None = None) -> Template:
    """Split ``text`` into literal text and parsed expressions with their positions."""
    parts: list[str | TemplateExpr] = []
    cursor = 0
    while (start := text.find(OPEN, cursor)) != -1:
        if start > cursor:
            parts.append(text[cursor:start])
        expr_pos = _offset_pos(pos, text, start, style)
        end = _find_close(text, start + len(OPEN))
        if end == -1:
            raise ExpressionError("unterminated expression: add the closing '}}'", expr_pos)
        body = text[start + len(OPEN) : end]
        parts.append(TemplateExpr(parse_expression(body, expr_pos), body.strip(), expr_pos))
        cursor = end + len(CLOSE)
    if cursor < len(text):
        parts.append(text[cursor:])
    return Template(tuple(parts))


def template_of(node: PScalar) -> Template:
    """The template of a string scalar node."""
    return parse_template(str(node.value), node.pos, node.style)


def has_expression(text: str) -> bool:
    """Whether ``text`` contains ``${{``."""
    return OPEN in text


def _step(value: Any, segment: Segment, path: Path, pos: Position) -> Any:
    if isinstance(segment, int):
        if isinstance(value, list) and segment < len(value):
            return value[segment]
        raise ExpressionEvaluationError(f"{path}: index [{segment}] is out of range", pos)
    if isinstance(value, Mapping) and segment in value:
        return value[segment]
    raise ExpressionEvaluationError(f"{path}: no {segment!r} here", pos)


def evaluate(expr: Expr, context: ExprContext, pos: Position) -> Any:
    """The value of ``expr`` in ``context``."""
    if isinstance(expr, Literal):
        return expr.value
    value = context.root(expr.root)
    if value is None:
        raise ExpressionEvaluationError(f"{expr.root} is not available here", pos)
    for segment in expr.segments:
        value = _step(value, segment, expr, pos)
    return value


def stringify(value: Any) -> str:
    """How a value is written when interpolated into a longer string."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float | str):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=False)


def render(template: Template, context: ExprContext) -> Any:
    """Evaluate a template: the typed value for a whole expression, else a string."""
    whole = template.whole
    if whole is not None:
        return evaluate(whole.expr, context, whole.pos)
    pieces: list[str] = []
    for part in template.parts:
        if isinstance(part, str):
            pieces.append(part)
        else:
            pieces.append(stringify(evaluate(part.expr, context, part.pos)))
    return "".join(pieces)


def render_string(text: str, context: ExprContext, pos: Position, style: str | None = None) -> Any:
    """Parse and evaluate a string that may contain expressions."""
    if not has_expression(text):
        return text
    return render(parse_template(text, pos, style), context)


def render_value(value: Any, context: ExprContext, pos: Position) -> Any:
    """Evaluate every string inside a plain (nested) value."""
    if isinstance(value, str):
        return render_string(value, context, pos)
    if isinstance(value, list):
        return [render_value(item, context, pos) for item in value]
    if isinstance(value, dict):
        return {key: render_value(item, context, pos) for key, item in value.items()}
    return value
