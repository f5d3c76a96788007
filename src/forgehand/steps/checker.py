"""Static checks of a step before anything runs, and the ``check_files`` API.

What is checked, each error positioned at the offending node:

* every expression names a declared input, a step that runs *earlier* in the same
  ``run:`` list, and a declared output of that step (when its spec is known);
* ``steps.*`` is not used outside ``run:`` items and ``outputs:``;
* inputs passed to a referenced step exist, required ones are given, and literal values
  or whole-value expressions of known type match the declared type;
* ``outputs:`` maps exactly the declared outputs (those without default are required),
  with matching types; ``delegate:`` names a step of the run list;
* everything the loader and the resolver check (syntax, schema, references, cycles).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgehand.steps.errors import Diagnostic, Position, StepError, StepTypeError, UnknownNameError
from forgehand.steps.expressions import (
    STRING_ROOTS,
    Expr,
    Literal,
    TemplateExpr,
    has_expression,
    template_of,
)
from forgehand.steps.expressions import Path as ExprPath
from forgehand.steps.model import RunItem, Spec, StepFile
from forgehand.steps.references import BuiltinRegistry, ResolvedStep, Resolver, StepFetcher
from forgehand.steps.values import ValueType, describe, type_of
from forgehand.steps.yamlpos import PMap, PNode, PScalar, to_plain, walk_strings


@dataclass
class _Scope:
    """What expressions at one place in a step file may name."""

    spec: Spec
    order: list[str]
    visible: Mapping[str, ResolvedStep | None] = field(default_factory=dict)
    steps_allowed: bool = False
    current: str | None = None


def _outputs_of(target: ResolvedStep | None) -> Mapping[str, Any] | None:
    """Declared outputs of a target step, following ``delegate``; None when unknown."""
    seen: set[str] = set()
    while target is not None and target.spec.delegate_outputs:
        if target.key in seen or target.file is None:
            return None
        seen.add(target.key)
        delegate = target.file.definition.delegate
        target = target.children.get(delegate) if delegate else None
    return target.spec.outputs if target is not None else None


class _Checker:
    def __init__(self, resolved: ResolvedStep) -> None:
        assert resolved.file is not None
        self.resolved = resolved
        self.file: StepFile = resolved.file
        self.diagnostics: list[Diagnostic] = []

    def _report(self, error: StepError) -> None:
        self.diagnostics.append(error.diagnostic())

    def run(self) -> list[Diagnostic]:
        definition = self.file.definition
        order = [item.name for item in definition.run or ()]
        base = _Scope(self.file.spec, order)
        self._expressions(definition.env, base)
        if definition.exec is not None:
            self._expressions(definition.exec.command, base)
            self._expressions(definition.exec.work_dir, base)
        for index, item in enumerate(definition.run or ()):
            self._item(item, self._item_scope(base, order, index))
        if definition.run is not None:
            self._outputs(self._item_scope(base, order, len(order)))
            self._delegate()
        return self.diagnostics

    def _item_scope(self, base: _Scope, order: list[str], index: int) -> _Scope:
        visible = {name: self.resolved.children.get(name) for name in order[:index]}
        current = order[index] if index < len(order) else None
        return _Scope(base.spec, order, visible, steps_allowed=True, current=current)

    # --- expressions ------------------------------------------------------------------

    def _expressions(self, node: PNode | None, scope: _Scope) -> None:
        for scalar in walk_strings(node):
            for expr in _templates(scalar):
                self._safely(self._path, expr, scope)

    def _safely(self, check: Any, *args: Any) -> None:
        try:
            check(*args)
        except StepError as error:
            self._report(error)

    def _path(self, texpr: TemplateExpr, scope: _Scope) -> None:
        expr = texpr.expr
        if not isinstance(expr, ExprPath):
            return
        if expr.root == "inputs":
            self._input_path(expr, scope, texpr.pos)
        elif expr.root == "steps":
            self._steps_path(expr, scope, texpr.pos)
        elif expr.root in STRING_ROOTS and expr.segments:
            raise UnknownNameError(f"{expr.root} is a string; it has no field {expr}", texpr.pos)
        elif expr.root == "env" and len(expr.segments) != 1:
            raise UnknownNameError(f"use env.NAME to read one variable, not {expr}", texpr.pos)

    def _input_path(self, expr: ExprPath, scope: _Scope, pos: Position) -> None:
        if not expr.segments:
            raise UnknownNameError("use inputs.NAME to read one input", pos)
        name = expr.segments[0]
        param = scope.spec.inputs.get(str(name))
        if param is None:
            known = ", ".join(scope.spec.inputs) or "none declared"
            raise UnknownNameError(f"unknown input {name!r} (inputs: {known})", pos)
        if len(expr.segments) > 1 and param.type not in {ValueType.STRUCT, ValueType.ARRAY}:
            raise UnknownNameError(
                f"input {name!r} is a {param.type.value}; {expr} does not exist", pos
            )

    def _steps_path(self, expr: ExprPath, scope: _Scope, pos: Position) -> None:
        if not scope.steps_allowed:
            raise UnknownNameError("steps.* can only be used in run: items and outputs:", pos)
        segments = expr.segments
        if len(segments) < 3 or segments[1] != "outputs":
            raise UnknownNameError(f"use steps.NAME.outputs.OUTPUT, not {expr}", pos)
        name = str(segments[0])
        self._visible_step(name, scope, pos)
        outputs = _outputs_of(scope.visible[name])
        if outputs is not None and str(segments[2]) not in outputs:
            known = ", ".join(outputs) or "none declared"
            raise UnknownNameError(
                f"step {name!r} has no output {segments[2]!r} (outputs: {known})", pos
            )

    def _visible_step(self, name: str, scope: _Scope, pos: Position) -> None:
        if name in scope.visible:
            return
        if name == scope.current:
            raise UnknownNameError(f"step {name!r} cannot use its own outputs", pos)
        if name in scope.order:
            raise UnknownNameError(
                f"step {name!r} runs later; only outputs of earlier steps can be used", pos
            )
        raise UnknownNameError(f"unknown step {name!r} (steps: {', '.join(scope.order)})", pos)

    # --- run items --------------------------------------------------------------------

    def _item(self, item: RunItem, scope: _Scope) -> None:
        self._expressions(item.env, scope)
        self._expressions(item.script, scope)
        self._expressions(item.inputs, scope)
        target = self.resolved.children.get(item.name)
        if target is not None:
            self._safely(self._inputs_match, item, target.spec, scope)

    def _inputs_match(self, item: RunItem, target: Spec, scope: _Scope) -> None:
        given = item.inputs or PMap((), item.pos)
        for entry in given:
            param = target.inputs.get(entry.key)
            if param is None:
                known = ", ".join(target.inputs) or "none"
                self._report(
                    UnknownNameError(
                        f"step {item.name!r} has no input {entry.key!r} (inputs: {known})",
                        entry.key_pos,
                    )
                )
                continue
            self._safely(_type_check, entry.value, param.type, f"input {entry.key!r}", scope)
        missing = [
            name for name, p in target.inputs.items() if p.required and not given.entry(name)
        ]
        if missing:
            raise UnknownNameError(
                f"step {item.name!r} needs input(s) {', '.join(missing)}", item.ref_pos or item.pos
            )

    # --- outputs ----------------------------------------------------------------------

    def _outputs(self, scope: _Scope) -> None:
        definition = self.file.definition
        outputs = definition.outputs
        if outputs is None:
            outputs = PMap((), definition.pos)
        else:
            self._expressions(outputs, scope)
        declared = self.file.spec.outputs
        for entry in outputs:
            param = declared.get(entry.key)
            if param is None:
                known = ", ".join(declared) or "none declared"
                self._report(
                    UnknownNameError(
                        f"output {entry.key!r} is not declared in spec (outputs: {known})",
                        entry.key_pos,
                    )
                )
                continue
            self._safely(_type_check, entry.value, param.type, f"output {entry.key!r}", scope)
        if self.file.spec.delegate_outputs:
            return
        missing = [name for name, p in declared.items() if p.required and not outputs.entry(name)]
        if missing:
            self._report(
                UnknownNameError(
                    f"outputs: must set declared output(s) {', '.join(missing)}", outputs.pos
                )
            )

    def _delegate(self) -> None:
        definition = self.file.definition
        if definition.delegate is None or definition.item(definition.delegate):
            return
        self._report(
            UnknownNameError(
                f"delegate names unknown step {definition.delegate!r}",
                definition.delegate_pos or definition.pos,
            )
        )


def _templates(scalar: PScalar) -> Iterator[TemplateExpr]:
    if has_expression(str(scalar.value)):
        yield from template_of(scalar).expressions


def infer_type(expr: Expr, scope: _Scope) -> ValueType | None:
    """The static type of an expression, when it can be known."""
    if isinstance(expr, Literal):
        return type_of(expr.value)
    if expr.root in STRING_ROOTS or expr.root == "env":
        return ValueType.STRING
    if expr.root == "inputs" and len(expr.segments) == 1:
        param = scope.spec.inputs.get(str(expr.segments[0]))
        return param.type if param else None
    if expr.root == "steps" and len(expr.segments) == 3:
        outputs = _outputs_of(scope.visible.get(str(expr.segments[0])))
        param = outputs.get(str(expr.segments[2])) if outputs else None
        return param.type if param else None
    return None


def _type_check(node: PNode, expected: ValueType, what: str, scope: _Scope) -> None:
    if isinstance(node, PScalar) and isinstance(node.value, str) and has_expression(node.value):
        template = template_of(node)
        whole = template.whole
        found = infer_type(whole.expr, scope) if whole else ValueType.STRING
        if found is not None and found is not expected:
            raise StepTypeError(
                f"{what} must be a {expected.value}, but this is a {found.value}", node.pos
            )
        return
    value = to_plain(node)
    if type_of(value) is not expected:
        raise StepTypeError(f"{what} must be a {expected.value}, not {describe(value)}", node.pos)


def check_resolved(resolved: ResolvedStep) -> list[Diagnostic]:
    """Static checks of a resolved step and, recursively, of the files it references."""
    diagnostics: list[Diagnostic] = []
    seen: set[str] = set()
    pending = [resolved]
    while pending:
        step = pending.pop()
        if step.key in seen or step.file is None:
            continue
        seen.add(step.key)
        diagnostics.extend(_Checker(step).run())
        pending.extend(child for child in step.children.values() if child is not None)
    return diagnostics


async def check_files_async(
    paths: Iterable[str | Path],
    *,
    fetcher: StepFetcher | None = None,
    builtins: BuiltinRegistry | None = None,
) -> list[Diagnostic]:
    """Load, resolve and check each step file; every problem as a ``Diagnostic``."""
    resolver = Resolver(fetcher=fetcher, builtins=builtins)
    found: set[Diagnostic] = set()
    for path in paths:
        try:
            found.update(check_resolved(await resolver.resolve(path)))
        except StepError as error:
            found.add(error.diagnostic())
        except OSError as error:
            found.add(Diagnostic(Position(str(path), 1, 1), f"cannot read step: {error}"))
    return sorted(found)


def check_files(
    paths: Iterable[str | Path],
    *,
    fetcher: StepFetcher | None = None,
    builtins: BuiltinRegistry | None = None,
) -> list[Diagnostic]:
    """Synchronous ``check_files_async``; call the async one from inside an event loop."""
    return asyncio.run(check_files_async(paths, fetcher=fetcher, builtins=builtins))
