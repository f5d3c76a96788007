"""The step language: GitLab CI steps / GitLab Functions syntax, loaded, checked and typed.

A step file (``func.yml``, or the older ``step.yml``) is two YAML documents, a ``spec:``
with typed inputs and outputs and a definition (``exec:`` or ``run:``). This package
loads it with source positions (``loader``), parses ``${{ }}`` expressions
(``expressions``) and evaluates them at run time (``evaluation``), resolves references
(``references``), checks everything statically (``checker``), reads what a step wrote
(``outputs``), masks secrets (``masking``), turns steps into agent tools (``tools``) and
records results (``results``), provides the built-in steps (``builtins``) and executes
steps (``engine``, also ``python -m forgehand.steps.engine``).

Names are imported lazily on first use, so ``python -m forgehand.steps.engine`` only pays
for the modules a step needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forgehand.steps.checker import check_files, check_files_async, check_resolved
    from forgehand.steps.engine import MemorySink, StepEngine, StepRequest, StepSink
    from forgehand.steps.errors import (
        BuiltinError,
        Diagnostic,
        ExpressionError,
        ExpressionEvaluationError,
        FetchError,
        OutputProtocolError,
        Position,
        ReferenceCycleError,
        SchemaError,
        StepError,
        StepReferenceError,
        StepSyntaxError,
        StepTypeError,
        UnknownNameError,
        UnsupportedReferenceError,
    )
    from forgehand.steps.evaluation import (
        eval_env,
        eval_node,
        exec_argv,
        exec_work_dir,
        item_inputs,
        item_script,
        sequence_outputs,
    )
    from forgehand.steps.expressions import (
        ExprContext,
        Template,
        evaluate,
        parse_expression,
        parse_template,
        render,
        render_string,
        render_value,
    )
    from forgehand.steps.loader import load_spec_text, load_step_file, load_step_text
    from forgehand.steps.masking import (
        MASK,
        Masker,
        StreamMasker,
        mask_sensitive,
        sensitive_values,
    )
    from forgehand.steps.model import (
        BuiltinRef,
        Definition,
        Exec,
        GitRef,
        LocalRef,
        OciRef,
        ParamSpec,
        RunItem,
        Spec,
        StepFile,
        StepRef,
    )
    from forgehand.steps.outputs import (
        bind_inputs,
        check_outputs,
        complete_outputs,
        parse_export_file,
        parse_output_file,
        step_environment,
    )
    from forgehand.steps.references import (
        BuiltinRegistry,
        GitFetcher,
        ResolvedStep,
        Resolver,
        StepFetcher,
    )
    from forgehand.steps.results import StepResult, StepStatus
    from forgehand.steps.tools import (
        ToolDiscovery,
        ToolStep,
        discover_tool_steps,
        input_schema,
        tool_definition,
        tool_name,
        tool_name_from_path,
    )
    from forgehand.steps.values import ValueType

_LAZY: dict[str, str] = {
    "MemorySink": "forgehand.steps.engine",
    "StepEngine": "forgehand.steps.engine",
    "StepRequest": "forgehand.steps.engine",
    "StepSink": "forgehand.steps.engine",
    "load_spec_text": "forgehand.steps.loader",
    "BuiltinError": "forgehand.steps.errors",
    "StreamMasker": "forgehand.steps.masking",
    "check_outputs": "forgehand.steps.outputs",
    "check_files": "forgehand.steps.checker",
    "check_files_async": "forgehand.steps.checker",
    "check_resolved": "forgehand.steps.checker",
    "Diagnostic": "forgehand.steps.errors",
    "ExpressionError": "forgehand.steps.errors",
    "ExpressionEvaluationError": "forgehand.steps.errors",
    "FetchError": "forgehand.steps.errors",
    "OutputProtocolError": "forgehand.steps.errors",
    "Position": "forgehand.steps.errors",
    "ReferenceCycleError": "forgehand.steps.errors",
    "SchemaError": "forgehand.steps.errors",
    "StepError": "forgehand.steps.errors",
    "StepReferenceError": "forgehand.steps.errors",
    "StepSyntaxError": "forgehand.steps.errors",
    "StepTypeError": "forgehand.steps.errors",
    "UnknownNameError": "forgehand.steps.errors",
    "UnsupportedReferenceError": "forgehand.steps.errors",
    "eval_env": "forgehand.steps.evaluation",
    "eval_node": "forgehand.steps.evaluation",
    "exec_argv": "forgehand.steps.evaluation",
    "exec_work_dir": "forgehand.steps.evaluation",
    "item_inputs": "forgehand.steps.evaluation",
    "item_script": "forgehand.steps.evaluation",
    "sequence_outputs": "forgehand.steps.evaluation",
    "ExprContext": "forgehand.steps.expressions",
    "Template": "forgehand.steps.expressions",
    "evaluate": "forgehand.steps.expressions",
    "parse_expression": "forgehand.steps.expressions",
    "parse_template": "forgehand.steps.expressions",
    "render": "forgehand.steps.expressions",
    "render_string": "forgehand.steps.expressions",
    "render_value": "forgehand.steps.expressions",
    "load_step_file": "forgehand.steps.loader",
    "load_step_text": "forgehand.steps.loader",
    "MASK": "forgehand.steps.masking",
    "Masker": "forgehand.steps.masking",
    "mask_sensitive": "forgehand.steps.masking",
    "sensitive_values": "forgehand.steps.masking",
    "BuiltinRef": "forgehand.steps.model",
    "Definition": "forgehand.steps.model",
    "Exec": "forgehand.steps.model",
    "GitRef": "forgehand.steps.model",
    "LocalRef": "forgehand.steps.model",
    "OciRef": "forgehand.steps.model",
    "ParamSpec": "forgehand.steps.model",
    "RunItem": "forgehand.steps.model",
    "Spec": "forgehand.steps.model",
    "StepFile": "forgehand.steps.model",
    "StepRef": "forgehand.steps.model",
    "bind_inputs": "forgehand.steps.outputs",
    "complete_outputs": "forgehand.steps.outputs",
    "parse_export_file": "forgehand.steps.outputs",
    "parse_output_file": "forgehand.steps.outputs",
    "step_environment": "forgehand.steps.outputs",
    "BuiltinRegistry": "forgehand.steps.references",
    "GitFetcher": "forgehand.steps.references",
    "ResolvedStep": "forgehand.steps.references",
    "Resolver": "forgehand.steps.references",
    "StepFetcher": "forgehand.steps.references",
    "StepResult": "forgehand.steps.results",
    "StepStatus": "forgehand.steps.results",
    "ToolDiscovery": "forgehand.steps.tools",
    "ToolStep": "forgehand.steps.tools",
    "discover_tool_steps": "forgehand.steps.tools",
    "input_schema": "forgehand.steps.tools",
    "tool_definition": "forgehand.steps.tools",
    "tool_name": "forgehand.steps.tools",
    "tool_name_from_path": "forgehand.steps.tools",
    "ValueType": "forgehand.steps.values",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "MASK",
    "BuiltinError",
    "BuiltinRef",
    "BuiltinRegistry",
    "Definition",
    "Diagnostic",
    "Exec",
    "ExprContext",
    "ExpressionError",
    "ExpressionEvaluationError",
    "FetchError",
    "GitFetcher",
    "GitRef",
    "LocalRef",
    "Masker",
    "MemorySink",
    "OciRef",
    "OutputProtocolError",
    "ParamSpec",
    "Position",
    "ReferenceCycleError",
    "ResolvedStep",
    "Resolver",
    "RunItem",
    "SchemaError",
    "Spec",
    "StepEngine",
    "StepError",
    "StepFetcher",
    "StepFile",
    "StepRef",
    "StepReferenceError",
    "StepRequest",
    "StepResult",
    "StepSink",
    "StepStatus",
    "StepSyntaxError",
    "StepTypeError",
    "StreamMasker",
    "Template",
    "ToolDiscovery",
    "ToolStep",
    "UnknownNameError",
    "UnsupportedReferenceError",
    "ValueType",
    "bind_inputs",
    "check_files",
    "check_files_async",
    "check_outputs",
    "check_resolved",
    "complete_outputs",
    "discover_tool_steps",
    "eval_env",
    "eval_node",
    "evaluate",
    "exec_argv",
    "exec_work_dir",
    "input_schema",
    "item_inputs",
    "item_script",
    "load_spec_text",
    "load_step_file",
    "load_step_text",
    "mask_sensitive",
    "parse_export_file",
    "parse_expression",
    "parse_output_file",
    "parse_template",
    "render",
    "render_string",
    "render_value",
    "sensitive_values",
    "sequence_outputs",
    "step_environment",
    "tool_definition",
    "tool_name",
    "tool_name_from_path",
]
