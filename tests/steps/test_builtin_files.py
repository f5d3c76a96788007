"""read_file, write_file, edit_file: success, every error, and confinement to the work dir."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import BuiltinCaller

from forgehand.steps.builtins import files

# --- read_file --------------------------------------------------------------------------


async def test_read_numbers_lines(builtin: BuiltinCaller, work: Path) -> None:
    (work / "a.txt").write_text("one\ntwo\nthree\n")
    out = await builtin.ok("read_file", path="a.txt")
    assert out["content"] == "     1\tone\n     2\ttwo\n     3\tthree\n"
    assert out["total_lines"] == 3
    assert (out["start_line"], out["end_line"], out["truncated"]) == (1, 3, False)


async def test_read_line_range(builtin: BuiltinCaller, work: Path) -> None:
    (work / "a.txt").write_text("".join(f"line {n}\n" for n in range(1, 11)))
    out = await builtin.ok("read_file", path="a.txt", start_line=4, end_line=5)
    assert out["content"] == "     4\tline 4\n     5\tline 5\n"
    assert (out["start_line"], out["end_line"], out["total_lines"]) == (4, 5, 10)


async def test_read_keeps_crlf_out_of_the_text(builtin: BuiltinCaller, work: Path) -> None:
    (work / "w.txt").write_bytes(b"a\r\nb")
    out = await builtin.ok("read_file", path="w.txt")
    assert out["content"] == "     1\ta\n     2\tb\n"


async def test_read_empty_file(builtin: BuiltinCaller, work: Path) -> None:
    (work / "e").write_text("")
    out = await builtin.ok("read_file", path="e")
    assert (out["content"], out["total_lines"], out["end_line"]) == ("", 0, 0)


async def test_read_caps_and_says_how_to_page(builtin: BuiltinCaller, work: Path) -> None:
    line = "x" * 1000 + "\n"
    (work / "big.txt").write_text(line * 600)
    out = await builtin.ok("read_file", path="big.txt")
    assert out["truncated"] is True
    last = out["end_line"]
    assert 200 < last < 600
    assert f"call read_file with start_line={last + 1}" in out["content"]
    assert len(out["content"]) <= files.MAX_READ_BYTES + 200
    rest = await builtin.ok("read_file", path="big.txt", start_line=last + 1)
    assert rest["start_line"] == last + 1


async def test_read_cuts_a_single_huge_line(builtin: BuiltinCaller, work: Path) -> None:
    (work / "min.js").write_text("y" * (files.MAX_READ_BYTES * 2))
    out = await builtin.ok("read_file", path="min.js")
    assert out["truncated"] is True
    assert out["end_line"] == 1


async def test_read_refuses_binary(builtin: BuiltinCaller, work: Path) -> None:
    (work / "b.bin").write_bytes(b"PK\x03\x04\x00\x01")
    error = await builtin.error("read_file", path="b.bin")
    assert error.startswith(
        "invalid_argument: b.bin looks like a binary file (NUL byte at offset 4)"
    )


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"path": "missing.txt"}, "not_found: missing.txt does not exist"),
        ({"path": "."}, "invalid_argument: . is a directory; use list_files"),
        ({"path": "a.txt", "start_line": 0}, "start_line must be a whole number >= 1"),
        ({"path": "a.txt", "start_line": 1.5}, "start_line must be a whole number >= 1"),
        ({"path": "a.txt", "start_line": 3, "end_line": 2}, "end_line 2 is before start_line 3"),
        ({"path": "a.txt", "start_line": 9}, "start_line 9 is past the end of a.txt (2 lines)"),
        ({"path": 5}, "input 'path' must be a string, not number"),
        ({}, "missing required input 'path'"),
    ],
)
async def test_read_errors(
    builtin: BuiltinCaller, work: Path, inputs: dict[str, object], message: str
) -> None:
    (work / "a.txt").write_text("1\n2\n")
    assert message in await builtin.error("read_file", **inputs)


# --- confinement ------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("do not read\n")
    return secret


@pytest.mark.parametrize("name", ["read_file", "edit_file", "write_file"])
async def test_dotdot_escape_is_denied(builtin: BuiltinCaller, outside: Path, name: str) -> None:
    inputs = {"path": "../outside/secret.txt", "content": "x", "old_text": "do", "new_text": "x"}
    spec_inputs = {
        "read_file": ["path"],
        "write_file": ["path", "content"],
        "edit_file": ["path", "old_text", "new_text"],
    }[name]
    error = await builtin.error(name, **{k: inputs[k] for k in spec_inputs})
    assert error.startswith("permission_denied: '../outside/secret.txt' is outside the work dir")
    assert outside.read_text() == "do not read\n"


async def test_absolute_path_outside_is_denied(builtin: BuiltinCaller, outside: Path) -> None:
    error = await builtin.error("read_file", path=str(outside))
    assert error.startswith("permission_denied:")


async def test_absolute_path_inside_is_allowed(builtin: BuiltinCaller, work: Path) -> None:
    (work / "in.txt").write_text("ok\n")
    out = await builtin.ok("read_file", path=str(work / "in.txt"))
    assert out["content"] == "     1\tok\n"


async def test_symlinked_file_escape_is_denied(
    builtin: BuiltinCaller, work: Path, outside: Path
) -> None:
    (work / "link.txt").symlink_to(outside)
    assert (await builtin.error("read_file", path="link.txt")).startswith("permission_denied")
    assert (await builtin.error("write_file", path="link.txt", content="pwned")).startswith(
        "permission_denied"
    )
    assert outside.read_text() == "do not read\n"


async def test_symlinked_dir_escape_is_denied_for_new_files(
    builtin: BuiltinCaller, work: Path, outside: Path
) -> None:
    (work / "sub").symlink_to(outside.parent)
    error = await builtin.error("write_file", path="sub/new/file.txt", content="x")
    assert error.startswith("permission_denied")
    assert not (outside.parent / "new").exists()


async def test_symlink_inside_the_work_dir_is_followed(builtin: BuiltinCaller, work: Path) -> None:
    (work / "real.txt").write_text("real\n")
    (work / "alias.txt").symlink_to("real.txt")
    await builtin.ok("write_file", path="alias.txt", content="changed\n")
    assert (work / "real.txt").read_text() == "changed\n"
    assert (work / "alias.txt").is_symlink()


# --- write_file -------------------------------------------------------------------------


async def test_write_creates_parents(builtin: BuiltinCaller, work: Path) -> None:
    out = await builtin.ok("write_file", path="a/b/c.txt", content="héllo\n")
    assert out == {"path": "a/b/c.txt", "bytes_written": 7}
    assert (work / "a/b/c.txt").read_text() == "héllo\n"


async def test_write_replaces_atomically_and_keeps_mode(builtin: BuiltinCaller, work: Path) -> None:
    script = work / "run.sh"
    script.write_text("old\n")
    script.chmod(0o755)
    await builtin.ok("write_file", path="run.sh", content="#!/bin/sh\nnew\n")
    assert script.read_text() == "#!/bin/sh\nnew\n"
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    assert sorted(os.listdir(work)) == ["run.sh"]  # no temporary file left behind


async def test_write_errors(builtin: BuiltinCaller, work: Path) -> None:
    (work / "d").mkdir()
    (work / "f").write_text("")
    assert "is a directory" in await builtin.error("write_file", path="d", content="x")
    error = await builtin.error("write_file", path="f/child.txt", content="x")
    assert error.startswith("failed_precondition: cannot create the parent directories")


# --- edit_file --------------------------------------------------------------------------

SOURCE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"


async def test_edit_replaces_the_single_match(builtin: BuiltinCaller, work: Path) -> None:
    (work / "m.py").write_text(SOURCE)
    out = await builtin.ok(
        "edit_file", path="m.py", old_text="    return a - b\n", new_text="    return b - a\n"
    )
    assert out == {"path": "m.py", "line": 6}
    assert (work / "m.py").read_text() == SOURCE.replace("a - b", "b - a")


async def test_edit_can_delete(builtin: BuiltinCaller, work: Path) -> None:
    (work / "m.py").write_text(SOURCE)
    await builtin.ok(
        "edit_file", path="m.py", old_text="\n\ndef sub(a, b):\n    return a - b\n", new_text=""
    )
    assert (work / "m.py").read_text() == "def add(a, b):\n    return a + b\n"


async def test_edit_several_matches_lists_their_lines(builtin: BuiltinCaller, work: Path) -> None:
    (work / "m.py").write_text(SOURCE)
    error = await builtin.error("edit_file", path="m.py", old_text="(a, b):", new_text="()")
    assert error == (
        "failed_precondition: old_text matches 2 times in m.py (starting at lines 1, 5); "
        "add surrounding lines to old_text so it matches once"
    )
    assert (work / "m.py").read_text() == SOURCE


async def test_edit_overlapping_matches_are_ambiguous(builtin: BuiltinCaller, work: Path) -> None:
    (work / "t").write_text("aaa\n")
    assert "matches 2 times" in await builtin.error(
        "edit_file", path="t", old_text="aa", new_text="b"
    )


async def test_edit_no_match_shows_the_closest_region(builtin: BuiltinCaller, work: Path) -> None:
    (work / "m.py").write_text(SOURCE)
    error = await builtin.error(
        "edit_file", path="m.py", old_text="def sub(a, b):\n  return a - b\n", new_text="x"
    )
    assert error.startswith("not_found: old_text was not found in m.py.")
    assert "The closest region is lines 5-6" in error
    assert "     5\tdef sub(a, b):\n     6\t    return a - b\n" in error
    assert "     3\t\n" in error  # context above
    assert "Copy the exact text from read_file" in error


async def test_edit_errors(builtin: BuiltinCaller, work: Path) -> None:
    (work / "m.py").write_text(SOURCE)
    (work / "b.bin").write_bytes(b"\x00\x01")
    (work / "latin1.txt").write_bytes(b"caf\xe9\n")
    assert "old_text is empty" in await builtin.error(
        "edit_file", path="m.py", old_text="", new_text="x"
    )
    assert "binary" in await builtin.error("edit_file", path="b.bin", old_text="a", new_text="b")
    assert "not UTF-8" in await builtin.error(
        "edit_file", path="latin1.txt", old_text="c", new_text="d"
    )
    assert "does not exist" in await builtin.error(
        "edit_file", path="no.py", old_text="a", new_text="b"
    )
    assert "The file is empty" in files.closest_region("", "x")
