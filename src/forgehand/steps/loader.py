"""Load a step file (``step.yml`` / ``func.yml``) into the typed model, strictly.

A step file is two YAML documents: ``spec:`` and the definition. Unknown keys, wrong
shapes, bad names, mistyped defaults and malformed ``${{ }}`` expressions are all
reported as ``StepError`` subclasses positioned at the offending node. Older and newer
GitLab spellings are both accepted: ``step:``/``func:`` in run items, ``run:``/``steps:``
for the sequence, and the legacy ``type: exec|steps`` key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from forgehand.steps.errors import Position, SchemaError, StepSyntaxError, StepTypeError
from forgehand.steps.expressions import has_expression, template_of
from forgehand.steps.model import (
    STEP_FILENAMES,
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
from forgehand.steps.values import TYPE_NAMES, ValueType, describe, matches
from forgehand.steps.yamlpos import (
    PMap,
    PNode,
    PScalar,
    PSeq,
    compose_documents,
    to_plain,
    walk_strings,
)

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
BUILTIN_PREFIX = "builtin://"
_OCI_RE = re.compile(r"^(oci://|[a-z0-9.-]+(:\d+)?/[^@\s]+:[\w][\w.-]*$)")
_PARAM_KEYS = {"type", "default", "sensitive", "description"}


def _kind(node: PNode | None) -> str:
    if node is None or (isinstance(node, PScalar) and node.value is None):
        return "nothing"
    if isinstance(node, PMap):
        return "a mapping"
    if isinstance(node, PSeq):
        return "a list"
    return describe(node.value)


def _expect_map(node: PNode | None, what: str, at: Position, *, empty_ok: bool = True) -> PMap:
    if isinstance(node, PMap):
        return node
    if empty_ok and (node is None or (isinstance(node, PScalar) and node.value is None)):
        return PMap((), node.pos if node else at)
    raise SchemaError(f"{what} must be a mapping, not {_kind(node)}", node.pos if node else at)


def _expect_str(node: PNode | None, what: str, at: Position) -> PScalar:
    if isinstance(node, PScalar) and isinstance(node.value, str):
        return node
    hint = "; quote it" if isinstance(node, PScalar) and node.value is not None else ""
    raise SchemaError(f"{what} must be a string, not {_kind(node)}{hint}", node.pos if node else at)


def _check_keys(node: PMap, allowed: set[str], what: str) -> None:
    for entry in node:
        if entry.key not in allowed:
            known = ", ".join(sorted(allowed))
            raise SchemaError(
                f"unknown key {entry.key!r} in {what} (allowed: {known})", entry.key_pos
            )


def _check_name(name: str, pos: Position, what: str) -> None:
    if not NAME_RE.match(name):
        raise SchemaError(
            f"invalid {what} name {name!r}: use letters, digits and underscores, "
            "not starting with a digit",
            pos,
        )


def _check_expressions(node: PNode | None) -> None:
    for scalar in walk_strings(node):
        if has_expression(str(scalar.value)):
            template_of(scalar)


# --- spec -----------------------------------------------------------------------------


def _param_type(node: PMap) -> ValueType:
    type_node = node.get("type")
    if type_node is None or (isinstance(type_node, PScalar) and type_node.value is None):
        return ValueType.STRING
    text = _expect_str(type_node, "type", node.pos)
    try:
        return ValueType(str(text.value))
    except ValueError:
        raise SchemaError(
            f"unknown type {text.value!r} (use one of: {TYPE_NAMES})", text.pos
        ) from None


def _param_default(node: PMap, value_type: ValueType, what: str) -> tuple[Any, bool]:
    entry = node.entry("default")
    if entry is None:
        return None, False
    for scalar in walk_strings(entry.value):
        if has_expression(str(scalar.value)):
            raise SchemaError(f"{what} defaults cannot use ${{{{ }}}} expressions", scalar.pos)
    value = to_plain(entry.value)
    if not matches(value, value_type):
        raise StepTypeError(
            f"default of {what} must be a {value_type.value}, not {describe(value)}",
            entry.value.pos,
        )
    return value, True


def _param(name: str, name_pos: Position, node: PNode | None, what: str) -> ParamSpec:
    _check_name(name, name_pos, what)
    body = _expect_map(node, f"{what} {name!r}", name_pos)
    _check_keys(body, _PARAM_KEYS, f"{what} {name!r}")
    value_type = _param_type(body)
    default, has_default = _param_default(body, value_type, f"{what} {name!r}")
    sensitive = body.get("sensitive")
    if sensitive is not None and not (
        isinstance(sensitive, PScalar) and isinstance(sensitive.value, bool)
    ):
        raise SchemaError("sensitive must be true or false", sensitive.pos)
    description = body.get("description")
    return ParamSpec(
        name=name,
        type=value_type,
        pos=name_pos,
        default=default,
        has_default=has_default,
        sensitive=bool(sensitive.value) if isinstance(sensitive, PScalar) else False,
        description=str(_expect_str(description, "description", name_pos).value)
        if description is not None
        else None,
    )


def _params(node: PNode | None, what: str, at: Position) -> dict[str, ParamSpec]:
    body = _expect_map(node, f"{what}s", at)
    return {e.key: _param(e.key, e.key_pos, e.value, what) for e in body}


def _spec(document: PNode | None, filename: str) -> Spec:
    top = _expect_map(document, "the first document", Position(filename, 1, 1), empty_ok=False)
    _check_keys(top, {"spec"}, "the first document")
    entry = top.entry("spec")
    if entry is None:
        raise SchemaError("the first document must contain spec:", top.pos)
    body = _expect_map(entry.value, "spec", entry.key_pos)
    _check_keys(body, {"inputs", "outputs", "description"}, "spec")
    outputs_node = body.get("outputs")
    delegate = isinstance(outputs_node, PScalar) and outputs_node.value == "delegate"
    description = body.get("description")
    return Spec(
        inputs=_params(body.get("inputs"), "input", entry.key_pos),
        outputs={} if delegate else _params(outputs_node, "output", entry.key_pos),
        pos=entry.key_pos,
        delegate_outputs=delegate,
        description=str(_expect_str(description, "description", body.pos).value)
        if description is not None
        else None,
    )


# --- references -----------------------------------------------------------------------


def _git_short(text: str) -> GitRef:
    location, _, rev = text.rpartition("@")
    url, _, directory = location.partition("/-/")
    if "://" not in url:
        url = "https://" + url
    return GitRef(url=url, rev=rev, dir=directory.strip("/"))


def parse_reference_text(text: str, pos: Position) -> StepRef:
    """Classify a ``step:`` string: local path, ``builtin://``, OCI or ``URL@REV``."""
    if text.startswith((".", "/")):
        return LocalRef(text)
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX) :]
        if not name:
            raise SchemaError("builtin:// needs a step name, e.g. builtin://read_file", pos)
        return BuiltinRef(name)
    if _OCI_RE.match(text):
        return OciRef(text)
    if "@" in text and not text.endswith("@"):
        return _git_short(text)
    raise SchemaError(
        f"cannot tell what step {text!r} refers to: use ./relative/path, builtin://NAME "
        "or a git URL@REV",
        pos,
    )


def _structured_reference(node: PMap) -> StepRef:
    _check_keys(node, {"git", "oci"}, "step reference")
    if node.get("oci") is not None:
        return OciRef(f"oci:{to_plain(node.get('oci'))}")
    git = _expect_map(node.get("git"), "git reference", node.pos, empty_ok=False)
    _check_keys(git, {"url", "rev", "dir"}, "git reference")
    url = _expect_str(git.get("url"), "git url", git.pos).value
    rev = _expect_str(git.get("rev"), "git rev", git.pos).value
    directory = git.get("dir")
    dir_text = _expect_str(directory, "git dir", git.pos).value if directory else ""
    return GitRef(url=str(url), rev=str(rev), dir=str(dir_text).strip("/"))


def parse_reference(node: PNode) -> StepRef:
    """The reference of a ``step:``/``func:`` value (string or ``{git: ...}``)."""
    if isinstance(node, PMap):
        return _structured_reference(node)
    text = _expect_str(node, "step reference", node.pos)
    return parse_reference_text(str(text.value), text.pos)


# --- definition -----------------------------------------------------------------------


def _env(node: PNode | None, at: Position) -> PMap | None:
    if node is None:
        return None
    env = _expect_map(node, "env", at)
    for entry in env:
        _expect_str(entry.value, f"env value of {entry.key}", entry.key_pos)
    _check_expressions(env)
    return env


def _exec(node: PNode | None, at: Position) -> Exec:
    body = _expect_map(node, "exec", at, empty_ok=False)
    _check_keys(body, {"command", "work_dir"}, "exec")
    command = body.get("command")
    if not isinstance(command, PSeq) or not command.items:
        where = command.pos if command else body.pos
        raise SchemaError("exec.command must be a non-empty list of strings (argv)", where)
    for item in command.items:
        _expect_str(item, "each exec.command item", command.pos)
    work_dir = body.get("work_dir")
    if work_dir is not None:
        _expect_str(work_dir, "exec.work_dir", body.pos)
    _check_expressions(body)
    return Exec(command, body.pos, work_dir if isinstance(work_dir, PScalar) else None)


def _run_item(node: PNode) -> RunItem:
    body = _expect_map(node, "each run item", node.pos, empty_ok=False)
    _check_keys(body, {"name", "step", "func", "script", "inputs", "env"}, "run item")
    name_node = body.get("name")
    if name_node is None:
        raise SchemaError("run item needs a name:", body.pos)
    name = _expect_str(name_node, "name", body.pos)
    _check_name(str(name.value), name.pos, "step")
    kinds = [key for key in ("step", "func", "script") if body.entry(key)]
    if len(kinds) != 1:
        raise SchemaError(
            f"run item {name.value!r} needs exactly one of step:, func:, script:", body.pos
        )
    env = _env(body.get("env"), body.pos)
    if kinds[0] == "script":
        return _script_item(body, str(name.value), env)
    ref_entry = body.entry(kinds[0])
    assert ref_entry is not None
    inputs = body.get("inputs")
    inputs_map = _expect_map(inputs, "inputs", body.pos) if inputs is not None else None
    _check_expressions(inputs_map)
    return RunItem(
        name=str(name.value),
        pos=body.pos,
        ref=parse_reference(ref_entry.value),
        ref_pos=ref_entry.value.pos,
        inputs=inputs_map,
        env=env,
    )


def _script_item(body: PMap, name: str, env: PMap | None) -> RunItem:
    inputs = body.entry("inputs")
    if inputs is not None:
        raise SchemaError("a script: item takes no inputs; use env: or expressions", inputs.key_pos)
    script = _expect_str(body.get("script"), "script", body.pos)
    if not str(script.value).strip():
        raise SchemaError("script must not be empty", script.pos)
    _check_expressions(script)
    return RunItem(name=name, pos=body.pos, script=script, env=env)


def _run(node: PNode | None, at: Position) -> tuple[RunItem, ...]:
    if not isinstance(node, PSeq) or not node.items:
        raise SchemaError("run must be a non-empty list of steps", node.pos if node else at)
    items = tuple(_run_item(item) for item in node.items)
    seen: set[str] = set()
    for item in items:
        if item.name in seen:
            raise SchemaError(f"duplicate step name {item.name!r}: names must be unique", item.pos)
        seen.add(item.name)
    return items


_DEFINITION_KEYS = {"exec", "run", "steps", "env", "outputs", "delegate", "type"}


def _body_kind(body: PMap) -> str:
    present = [key for key in ("exec", "run", "steps") if body.entry(key)]
    if len(present) != 1:
        raise SchemaError("the definition needs exactly one of exec: or run:", body.pos)
    legacy = body.get("type")
    if legacy is not None:
        expected = "exec" if present[0] == "exec" else "steps"
        if not (isinstance(legacy, PScalar) and legacy.value == expected):
            raise SchemaError(
                f"type must be {expected!r} for this definition (or omit it)", legacy.pos
            )
    return present[0]


def _definition(document: PNode | None, spec: Spec, filename: str) -> Definition:
    body = _expect_map(document, "the definition", Position(filename, 1, 1), empty_ok=False)
    _check_keys(body, _DEFINITION_KEYS, "the definition")
    kind = _body_kind(body)
    env = _env(body.get("env"), body.pos)
    if kind == "exec":
        for key in ("outputs", "delegate"):
            if (entry := body.entry(key)) is not None:
                raise SchemaError(f"{key}: is only valid with run:", entry.key_pos)
        return Definition(pos=body.pos, exec=_exec(body.get("exec"), body.pos), env=env)
    return _run_definition(body, spec, env)


def _run_definition(body: PMap, spec: Spec, env: PMap | None) -> Definition:
    run = _run(body.get("run") or body.get("steps"), body.pos)
    outputs = body.get("outputs")
    outputs_map = _expect_map(outputs, "outputs", body.pos) if outputs is not None else None
    _check_expressions(outputs_map)
    delegate = body.get("delegate")
    delegate_name = _expect_str(delegate, "delegate", body.pos) if delegate is not None else None
    _check_delegate(spec, body, outputs_map, delegate_name)
    return Definition(
        pos=body.pos,
        run=run,
        env=env,
        outputs=outputs_map,
        delegate=str(delegate_name.value) if delegate_name else None,
        delegate_pos=delegate_name.pos if delegate_name else None,
    )


def _check_delegate(spec: Spec, body: PMap, outputs: PMap | None, delegate: PScalar | None) -> None:
    if spec.delegate_outputs and delegate is None:
        raise SchemaError(
            "spec has outputs: delegate, so the definition needs delegate: STEP", body.pos
        )
    if delegate is not None and not spec.delegate_outputs:
        raise SchemaError("delegate: needs outputs: delegate in the spec", delegate.pos)
    if delegate is not None and outputs is not None:
        raise SchemaError("use either outputs: or delegate:, not both", outputs.pos)


# --- files ----------------------------------------------------------------------------


def load_step_text(text: str, filename: str) -> StepFile:
    """Load a step from its text; ``filename`` is used in positions and as its path."""
    documents = compose_documents(text, filename)
    if len(documents) != 2:
        raise StepSyntaxError(
            f"a step file has two YAML documents (spec, then definition) separated by ---; "
            f"found {len(documents)}",
            Position(filename, 1, 1),
        )
    spec = _spec(documents[0], filename)
    return StepFile(path=filename, spec=spec, definition=_definition(documents[1], spec, filename))


def load_spec_text(text: str, filename: str) -> Spec:
    """Load a spec-only document (``spec:`` with inputs and outputs), e.g. a built-in's."""
    documents = compose_documents(text, filename)
    if len(documents) != 1:
        raise StepSyntaxError(
            f"a spec document is one YAML document; found {len(documents)}",
            Position(filename, 1, 1),
        )
    return _spec(documents[0], filename)


def find_step_file(path: Path) -> Path:
    """The step file for ``path``: the file itself, or a directory's func.yml/step.yml."""
    if path.is_dir():
        for name in STEP_FILENAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} has no {' or '.join(STEP_FILENAMES)}")
    return path


def load_step_file(path: str | Path) -> StepFile:
    """Load a step file, or a directory's func.yml / step.yml."""
    file = find_step_file(Path(path))
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StepSyntaxError(f"cannot read step file: {exc}", Position(str(file), 1, 1)) from None
    return load_step_text(text, str(file))
