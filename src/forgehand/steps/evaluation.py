"""Run-time evaluation of a step's parts, for the runner's step engine.

Each helper evaluates the ``${{ }}`` expressions of one part of a loaded step in an
``ExprContext`` and returns plain values: the argv of an ``exec``, an ``env`` mapping,
the inputs a ``run:`` item passes, or a sequence's ``outputs:``. Errors are
``ExpressionEvaluationError`` (a name is missing at run time) or ``StepTypeError``,
positioned at the node that failed.
"""

from __future__ import annotations

from typing import Any

from forgehand.steps.errors import StepTypeError
from forgehand.steps.expressions import ExprContext, has_expression, render, stringify, template_of
from forgehand.steps.model import Exec, RunItem
from forgehand.steps.yamlpos import PMap, PNode, PScalar, PSeq


def eval_node(node: PNode | None, context: ExprContext) -> Any:
    """The plain value of ``node`` with every expression evaluated (typed when whole)."""
    if node is None:
        return None
    if isinstance(node, PScalar):
        if isinstance(node.value, str) and has_expression(node.value):
            return render(template_of(node), context)
        return node.value
    if isinstance(node, PSeq):
        return [eval_node(item, context) for item in node.items]
    return {entry.key: eval_node(entry.value, context) for entry in node.entries}


def _as_text(node: PScalar, context: ExprContext, what: str) -> str:
    value = eval_node(node, context)
    if isinstance(value, dict | list) or value is None:
        raise StepTypeError(
            f"{what} must evaluate to text, not {stringify(value) or 'null'}", node.pos
        )
    return stringify(value)


def exec_argv(exec_: Exec, context: ExprContext) -> list[str]:
    """The argv of an ``exec:`` (numbers and booleans are written as text)."""
    return [
        _as_text(item, context, "each exec.command item")
        for item in exec_.command.items
        if isinstance(item, PScalar)
    ]


def exec_work_dir(exec_: Exec, context: ExprContext) -> str | None:
    """The evaluated ``exec.work_dir``, if set."""
    return _as_text(exec_.work_dir, context, "exec.work_dir") if exec_.work_dir else None


def eval_env(env: PMap | None, context: ExprContext) -> dict[str, str]:
    """An evaluated ``env:`` mapping."""
    if env is None:
        return {}
    return {
        entry.key: _as_text(entry.value, context, f"env value of {entry.key}")
        for entry in env
        if isinstance(entry.value, PScalar)
    }


def item_inputs(item: RunItem, context: ExprContext) -> dict[str, Any]:
    """The inputs a ``run:`` item passes to its step (bind them with ``bind_inputs``)."""
    return eval_node(item.inputs, context) or {}


def item_script(item: RunItem, context: ExprContext) -> str | None:
    """The evaluated text of a ``script:`` item."""
    return _as_text(item.script, context, "script") if item.script else None


def sequence_outputs(outputs: PMap | None, context: ExprContext) -> dict[str, Any]:
    """The evaluated ``outputs:`` of a ``run:`` definition (check with ``complete_outputs``)."""
    return eval_node(outputs, context) or {}
