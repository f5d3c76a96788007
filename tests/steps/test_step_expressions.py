"""Expressions: parsing, typed whole values, interpolation, errors, and fuzzing."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forgehand.steps import (
    ExprContext,
    ExpressionError,
    ExpressionEvaluationError,
    Position,
    parse_template,
    render,
    render_string,
    render_value,
)
from forgehand.steps.expressions import Literal, Path, parse_expression

POS = Position("s.yml", 7, 5)

CONTEXT = ExprContext(
    inputs={
        "name": "joe",
        "count": 3,
        "ratio": 1.5,
        "flag": True,
        "config": {"db": {"host": "localhost", "ports": [5432, 5433]}},
        "items": ["a", {"b": "c"}],
        "nothing": None,
    },
    env={"HOME": "/home/joe", "WEIRD-NAME": "w"},
    steps={"build": {"artifact": "out.tar", "size": 10}},
    step_dir="/steps/echo",
    work_dir="/work",
    output_file="/tmp/out.jsonl",
    export_file="/tmp/export.jsonl",
)


def ev(text: str) -> Any:
    return render(parse_template(text, POS), CONTEXT)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("${{ inputs.count }}", 3),
        ("${{inputs.flag}}", True),
        ("${{ inputs.ratio }}", 1.5),
        ("${{ inputs.config }}", {"db": {"host": "localhost", "ports": [5432, 5433]}}),
        ("${{ inputs.config.db.host }}", "localhost"),
        ("${{ inputs.config.db.ports[1] }}", 5433),
        ("${{ inputs.config['db'][\"ports\"][0] }}", 5432),
        ("${{ inputs.items[1].b }}", "c"),
        ("${{ inputs.items }}", ["a", {"b": "c"}]),
        ("${{ inputs.nothing }}", None),
        ("${{ env.HOME }}", "/home/joe"),
        ('${{ env["WEIRD-NAME"] }}', "w"),
        ("${{ steps.build.outputs.size }}", 10),
        ("${{ step_dir }}", "/steps/echo"),
        ("${{ func_dir }}", "/steps/echo"),
        ("${{ work_dir }}", "/work"),
        ("${{ output_file }}", "/tmp/out.jsonl"),
        ("${{ export_file }}", "/tmp/export.jsonl"),
        ("${{ 42 }}", 42),
        ("${{ 'a\\'b' }}", "a'b"),
        ("${{ null }}", None),
    ],
)
def test_whole_value_is_typed(text: str, value: Any) -> None:
    assert ev(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("hello ${{ inputs.name }}!", "hello joe!"),
        ("n=${{ inputs.count }} f=${{ inputs.flag }}", "n=3 f=true"),
        ("cfg=${{ inputs.config.db }}", 'cfg={"host":"localhost","ports":[5432,5433]}'),
        ("list=${{ inputs.items }}", 'list=["a",{"b":"c"}]'),
        ("[${{ inputs.nothing }}]", "[]"),
        ("${{ step_dir }}/run.sh", "/steps/echo/run.sh"),
        (" ${{ inputs.count }}", " 3"),
        ("${{ inputs.name }}${{ inputs.name }}", "joejoe"),
        ("no expressions", "no expressions"),
        ("${{ '}}' }}", "}}"),
    ],
)
def test_embedded_expressions_interpolate(text: str, value: str) -> None:
    assert render_string(text, CONTEXT, POS) == value


def test_render_value_nested() -> None:
    raw = {"a": ["${{ inputs.count }}", "x ${{ inputs.name }}"], "b": True}
    assert render_value(raw, CONTEXT, POS) == {"a": [3, "x joe"], "b": True}


def test_huge_number_is_our_error() -> None:
    with pytest.raises(ExpressionError):
        parse_template("${{ " + "9" * 5000 + " }}", POS)


def test_parse_ast() -> None:
    assert parse_expression(" inputs.a[0]['b'] ", POS) == Path("inputs", ("a", 0, "b"))
    assert parse_expression("true", POS) == Literal(True)
    assert parse_expression('"a\\"b"', POS) == Literal('a"b')


def test_expression_position_within_line() -> None:
    template = parse_template("abc ${{ inputs.x }} ${{ env.Y }}", POS)
    assert [str(e.pos) for e in template.expressions] == ["s.yml:7:9", "s.yml:7:25"]


def test_expression_position_in_block_scalar() -> None:
    template = parse_template("line one\n  x ${{ env.A }}\n", POS, style="|")
    assert str(template.expressions[0].pos) == "s.yml:9:5"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("${{ inputs.missing }}", "no 'missing' here"),
        ("${{ inputs.items[5] }}", "out of range"),
        ("${{ inputs.name.first }}", "no 'first' here"),
        ("${{ steps.later.outputs.x }}", "no 'later' here"),
        ("x ${{ env.NOPE }}", "no 'NOPE' here"),
    ],
)
def test_evaluation_errors(text: str, fragment: str) -> None:
    with pytest.raises(ExpressionEvaluationError, match=fragment) as info:
        ev(text)
    assert info.value.position.file == "s.yml"


def test_unavailable_root() -> None:
    with pytest.raises(ExpressionEvaluationError, match="output_file is not available"):
        render_string("${{ output_file }}", ExprContext(), POS)


@pytest.mark.parametrize(
    "text",
    [
        "${{ }}",
        "${{ inputs. }}",
        "${{ inputs[ }}",
        "${{ inputs[1 }}",
        "${{ inputs[-1] }}",
        "${{ inputs[1.5] }}",
        "${{ inputs.a + 1 }}",
        "${{ eval('x') }}",
        "${{ __import__ }}",
        "${{ inputs.a",
        "${{ 'open }}",
        "${{ inputs.a b }}",
        "${{ 1 2 }}",
    ],
)
def test_syntax_errors(text: str) -> None:
    with pytest.raises(ExpressionError):
        parse_template(text, POS)


@given(st.text())
def test_random_text_only_raises_our_error(text: str) -> None:
    try:
        template = parse_template(text, POS)
        render(template, CONTEXT)
    except ExpressionError:
        pass


expression_alphabet = st.sampled_from(
    [*list("inputsenvstep_dir.[]'\"0123456789 ${}-+!xyz"), "${{", "}}", "inputs.", "steps."]
)


@given(st.lists(expression_alphabet, max_size=30).map("".join))
def test_expression_like_text_only_raises_our_error(text: str) -> None:
    with contextlib.suppress(ExpressionError):
        render(parse_template(text, POS), CONTEXT)


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40))
def test_random_expression_bodies(body: str) -> None:
    with contextlib.suppress(ExpressionError):
        render(parse_template("${{" + body + "}}", POS), CONTEXT)
