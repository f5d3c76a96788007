"""The step language: GitLab CI steps / GitLab Functions syntax, loaded, checked and typed.

A step file (``func.yml``, or the older ``step.yml``) is two YAML documents, a ``spec:``
with typed inputs and outputs and a definition (``exec:`` or ``run:``). This package
loads it with source positions (``loader``), parses ``${{ }}`` expressions
(``expressions``) and evaluates them at run time (``evaluation``), resolves references
(``references``), checks everything statically (``checker``), reads what a step wrote
(``outputs``), masks secrets (``masking``), turns steps into agent tools (``tools``) and
records results (``results``). Running steps is the runner's job; this package is what
its step engine calls.
"""

from forgehand.steps.checker import check_files, check_files_async, check_resolved
from forgehand.steps.errors import (
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
from forgehand.steps.loader import load_step_file, load_step_text
from forgehand.steps.masking import MASK, Masker, mask_sensitive, sensitive_values
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

__all__ = [
    "MASK",
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
    "StepError",
    "StepFetcher",
    "StepFile",
    "StepRef",
    "StepReferenceError",
    "StepResult",
    "StepStatus",
    "StepSyntaxError",
    "StepTypeError",
    "Template",
    "ToolDiscovery",
    "ToolStep",
    "UnknownNameError",
    "UnsupportedReferenceError",
    "ValueType",
    "bind_inputs",
    "check_files",
    "check_files_async",
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
