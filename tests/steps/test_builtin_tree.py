"""list_files and search, and the .gitignore semantics they share."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import BuiltinCaller

from forgehand.steps.builtins import tree
from forgehand.steps.builtins.gitignore import IgnoreRules, parse_ignore_file, translate


def _rules(text: str, base: str = "") -> IgnoreRules:
    return IgnoreRules(tuple(parse_ignore_file(text, base)))


@pytest.mark.parametrize(
    ("pattern", "path", "is_dir", "ignored"),
    [
        ("*.log", "a.log", False, True),
        ("*.log", "deep/er/a.log", False, True),  # no slash: any depth
        ("*.log", "a.logx", False, False),
        ("/build", "build", True, True),  # anchored
        ("/build", "src/build", True, False),
        ("doc/*.txt", "doc/a.txt", False, True),  # a middle slash anchors too
        ("doc/*.txt", "x/doc/a.txt", False, False),
        ("doc/*.txt", "doc/sub/a.txt", False, False),  # * does not cross /
        ("out/", "out", True, True),  # directory only
        ("out/", "out", False, False),
        ("**/cache", "a/b/cache", False, True),
        ("**/cache", "cache", False, True),
        ("logs/**", "logs/a/b.txt", False, True),
        ("logs/**", "logs", True, False),
        ("a/**/z", "a/z", False, True),
        ("a/**/z", "a/b/c/z", False, True),
        ("fo?.c", "foo.c", False, True),
        ("fo?.c", "fo/.c", False, False),
        ("[abc].py", "b.py", False, True),
        ("[!abc].py", "b.py", False, False),
        ("[!abc].py", "d.py", False, True),
        ("\\#notes", "#notes", False, True),
        ("# comment", "# comment", False, False),
        ("trailing   ", "trailing", False, True),
        ("\\!bang", "!bang", False, True),
    ],
)
def test_gitignore_patterns(pattern: str, path: str, is_dir: bool, ignored: bool) -> None:
    assert _rules(pattern).ignored(path, is_dir) is ignored


def test_negation_and_order() -> None:
    rules = _rules("*.log\n!keep.log\n")
    assert rules.ignored("a.log", False)
    assert not rules.ignored("keep.log", False)
    assert _rules("!keep.log\n*.log\n").ignored("keep.log", False)  # the last match wins


def test_nested_rules_apply_below_their_directory() -> None:
    rules = _rules("*.tmp\n").extended(Path("/nonexistent"), "sub/")
    nested = IgnoreRules(rules.rules + tuple(parse_ignore_file("!x.tmp\n/only\n", "sub/")))
    assert nested.ignored("a.tmp", False)
    assert not nested.ignored("sub/x.tmp", False)
    assert nested.ignored("x.tmp", False)
    assert nested.ignored("sub/only", False)
    assert not nested.ignored("only", False)


def test_translate_keeps_literals_literal() -> None:
    assert translate("a.b+c") == r"a\.b\+c"
    assert translate("[unclosed") == r"\[unclosed"


@pytest.fixture
def repo(work: Path) -> Path:
    layout = {
        ".gitignore": "*.log\nbuild/\n/top.txt\n!important.log\nnode_modules\n",
        "top.txt": "",
        "keep.py": "import os\n",
        "debug.log": "",
        "important.log": "needle in a log\n",
        "build/out.py": "needle\n",
        "node_modules/x/index.js": "needle\n",
        "src/top.txt": "needle top\n",
        "src/app.py": "def main():\n    return 'needle'\n",
        "src/.gitignore": "generated/\n!debug.log\n*.py[co]\n",
        "src/debug.log": "",
        "src/app.pyc": "",
        "src/generated/g.py": "needle\n",
        "docs/readme.md": "Needle\n",
        ".git/config": "needle\n",
        ".git/info/exclude": "secret-local.txt\n",
        "secret-local.txt": "needle\n",
    }
    for name, text in layout.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    return work


async def test_list_respects_gitignore(builtin: BuiltinCaller, repo: Path) -> None:
    out = await builtin.ok("list_files")
    assert out["files"] == [
        ".gitignore",
        "docs/readme.md",
        "important.log",
        "keep.py",
        "src/.gitignore",
        "src/app.py",
        "src/debug.log",
        "src/top.txt",
    ]
    assert (out["count"], out["truncated"], out["note"]) == (8, False, "")


async def test_list_pattern_and_path(builtin: BuiltinCaller, repo: Path) -> None:
    assert (await builtin.ok("list_files", pattern="*.py"))["files"] == ["keep.py", "src/app.py"]
    assert (await builtin.ok("list_files", path="src", pattern="*.py"))["files"] == ["src/app.py"]
    assert (await builtin.ok("list_files", pattern="src/*.log"))["files"] == ["src/debug.log"]
    assert (await builtin.ok("list_files", pattern="**/*.md"))["files"] == ["docs/readme.md"]


async def test_list_nested_gitignore_applies_when_starting_below(
    builtin: BuiltinCaller, repo: Path
) -> None:
    out = await builtin.ok("list_files", path="src")
    assert out["files"] == ["src/.gitignore", "src/app.py", "src/debug.log", "src/top.txt"]


async def test_list_does_not_follow_directory_symlinks(
    builtin: BuiltinCaller, work: Path, tmp_path: Path
) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.txt").write_text("")
    (work / "link").symlink_to(tmp_path / "elsewhere")
    (work / "loop").symlink_to(work)
    assert (await builtin.ok("list_files"))["files"] == []


async def test_list_caps_with_a_note(
    builtin: BuiltinCaller, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tree, "MAX_FILES", 3)
    for n in range(5):
        (work / f"f{n}").write_text("")
    out = await builtin.ok("list_files")
    assert out["files"] == ["f0", "f1", "f2"]
    assert out["truncated"] is True
    assert "narrower pattern" in out["note"]


async def test_list_errors(builtin: BuiltinCaller, work: Path) -> None:
    assert "not_found: nope does not exist" in await builtin.error("list_files", path="nope")
    assert "permission_denied" in await builtin.error("list_files", path="..")
    assert "pattern is empty" in await builtin.error("list_files", pattern="")


async def test_search_results(builtin: BuiltinCaller, repo: Path) -> None:
    out = await builtin.ok("search", pattern="needle")
    assert out["matches"] == (
        "important.log:1: needle in a log\n"
        "src/app.py:2:     return 'needle'\n"
        "src/top.txt:1: needle top\n"
    )
    assert (out["count"], out["truncated"]) == (3, False)


async def test_search_regex_path_and_no_match(builtin: BuiltinCaller, repo: Path) -> None:
    out = await builtin.ok("search", pattern="(?i)^needle$", path="docs")
    assert out["matches"] == "docs/readme.md:1: Needle\n"
    file_only = await builtin.ok("search", pattern="main", path="src/app.py")
    assert file_only["matches"] == "src/app.py:1: def main():\n"
    assert (await builtin.ok("search", pattern="absent"))["count"] == 0


async def test_search_skips_binary_and_escaping_symlinks(
    builtin: BuiltinCaller, work: Path, tmp_path: Path
) -> None:
    (work / "bin").write_bytes(b"needle\x00")
    (tmp_path / "secret").write_text("needle\n")
    (work / "leak").symlink_to(tmp_path / "secret")
    (work / "ok").write_text("needle\n")
    assert (await builtin.ok("search", pattern="needle"))["matches"] == "ok:1: needle\n"


async def test_search_caps(
    builtin: BuiltinCaller, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tree, "MAX_MATCHES", 2)
    (work / "x").write_text("hit\n" * 5)
    out = await builtin.ok("search", pattern="hit")
    assert out["count"] == 2
    assert out["truncated"] is True
    assert out["matches"].endswith("[stopped at 2 matches; narrow the pattern or the path]\n")


async def test_search_errors(builtin: BuiltinCaller, work: Path) -> None:
    assert "invalid regular expression '('" in await builtin.error("search", pattern="(")
    assert "permission_denied" in await builtin.error("search", pattern="x", path="/")
