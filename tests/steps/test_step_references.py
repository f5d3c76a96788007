"""References: local, builtin, OCI refusal, cycles, and the git fetcher on a local bare repo."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from forgehand.steps import (
    BuiltinRegistry,
    FetchError,
    GitFetcher,
    ReferenceCycleError,
    Resolver,
    StepReferenceError,
    UnsupportedReferenceError,
    check_files_async,
    load_step_text,
)

WriteStep = Callable[[str, str], Path]

LEAF = "spec:\n  outputs:\n    out: {}\n---\nexec:\n  command: [echo]\n"


async def test_local_directory_prefers_func_yml(write_step: WriteStep) -> None:
    write_step("leaf/func.yml", LEAF)
    write_step("leaf/step.yml", "spec:\n---\nexec:\n  command: [old]\n")
    main = write_step("main/step.yml", "spec:\n---\nrun:\n  - name: a\n    step: ../leaf\n")
    resolved = await Resolver().resolve(main)
    child = resolved.children["a"]
    assert child is not None
    assert child.key.endswith("leaf/func.yml")
    assert "out" in child.spec.outputs


async def test_local_file_reference(write_step: WriteStep) -> None:
    write_step("lib/echo.yml", LEAF)
    main = write_step("main/step.yml", "spec:\n---\nrun:\n  - name: a\n    step: ../lib/echo.yml\n")
    resolved = await Resolver().resolve(main.parent)
    assert resolved.children["a"] is not None


async def test_missing_local_step(write_step: WriteStep) -> None:
    main = write_step("main/step.yml", "spec:\n---\nrun:\n  - name: a\n    step: ./nowhere\n")
    with pytest.raises(StepReferenceError, match=r"step '\./nowhere' not found") as info:
        await Resolver().resolve(main)
    assert (info.value.position.line, info.value.position.col) == (5, 11)


async def test_cycle_is_reported_with_the_cycle(write_step: WriteStep) -> None:
    a = write_step("a/step.yml", "spec:\n---\nrun:\n  - name: to_b\n    step: ../b\n")
    write_step("b/step.yml", "spec:\n---\nrun:\n  - name: to_a\n    step: ../a\n")
    with pytest.raises(ReferenceCycleError) as info:
        await Resolver().resolve(a)
    error = info.value
    assert [Path(p).parent.name for p in error.cycle] == ["a", "b", "a"]
    assert error.position.file.endswith("b/step.yml")
    assert (error.position.line, error.position.col) == (5, 11)
    assert "a/step.yml -> " in str(error)


async def test_self_reference_is_a_cycle(write_step: WriteStep) -> None:
    a = write_step("a/step.yml", "spec:\n---\nrun:\n  - name: again\n    step: ./\n")
    with pytest.raises(ReferenceCycleError):
        await Resolver().resolve(a)


async def test_diamond_is_not_a_cycle(write_step: WriteStep) -> None:
    write_step("leaf/step.yml", LEAF)
    write_step("b/step.yml", "spec:\n---\nrun:\n  - name: l\n    step: ../leaf\n")
    main = write_step(
        "main/step.yml",
        "spec:\n---\nrun:\n  - name: x\n    step: ../b\n  - name: y\n    step: ../leaf\n",
    )
    assert await check_files_async([main]) == []


async def test_oci_reference_is_refused_clearly(write_step: WriteStep) -> None:
    main = write_step(
        "main/step.yml",
        "spec:\n---\nrun:\n  - name: a\n    step: registry.gitlab.com/org/echo:1.0.0\n",
    )
    with pytest.raises(UnsupportedReferenceError) as info:
        await Resolver().resolve(main)
    assert str(info.value) == (
        f"{main}:5:11: OCI step references are not supported yet; vendor the step into "
        ".forgehand/steps/ or use a git reference"
    )


async def test_structured_oci_reference_is_refused(write_step: WriteStep) -> None:
    main = write_step(
        "main/step.yml",
        """
        spec:
        ---
        run:
          - name: a
            step:
              oci: {registry: registry.gitlab.com, repository: org/echo, tag: "1"}
        """,
    )
    with pytest.raises(UnsupportedReferenceError, match="vendor the step"):
        await Resolver().resolve(main)


async def test_builtin_registry(write_step: WriteStep) -> None:
    spec = load_step_text(
        "spec:\n  inputs:\n    path: {}\n  outputs:\n    content: {}\n---\nexec:\n  command: [x]\n",
        "builtin",
    ).spec
    main = write_step(
        "main/step.yml",
        """
        spec:
        ---
        run:
          - name: read
            step: builtin://read_file
            inputs: {path: README.md}
          - name: show
            script: echo ${{ steps.read.outputs.content }} ${{ steps.read.outputs.size }}
        """,
    )
    registry = BuiltinRegistry({"read_file": spec})
    found = await check_files_async([main], builtins=registry)
    assert [d.message for d in found] == ["step 'read' has no output 'size' (outputs: content)"]
    resolved = await Resolver(builtins=registry).resolve(main)
    child = resolved.children["read"]
    assert child is not None
    assert child.is_builtin


async def test_unknown_builtin(write_step: WriteStep) -> None:
    main = write_step("m/step.yml", "spec:\n---\nrun:\n  - name: a\n    step: builtin://nope\n")
    with pytest.raises(StepReferenceError, match="unknown builtin step 'nope'"):
        await Resolver().resolve(main)


# --- git ------------------------------------------------------------------------------

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="install git to run")


def git(*args: str, cwd: Path) -> str:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "HOME": str(cwd),
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)
    return done.stdout.decode().strip()


@pytest.fixture
def bare_repo(tmp_path: Path) -> tuple[Path, str]:
    """A bare repository with a tagged step under steps/echo; returns (path, sha)."""
    work = tmp_path / "work"
    (work / "steps" / "echo").mkdir(parents=True)
    (work / "steps" / "echo" / "func.yml").write_text(
        "spec:\n  inputs:\n    msg: {}\n  outputs:\n    said: {}\n---\nexec:\n  command: [echo]\n"
    )
    (work / "step.yml").write_text(LEAF)
    git("init", "-q", "-b", "main", cwd=work)
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "v1", cwd=work)
    git("tag", "v1", cwd=work)
    sha = git("rev-parse", "HEAD", cwd=work)
    (work / "step.yml").write_text("spec:\n---\nexec:\n  command: [v2]\n")
    git("commit", "-q", "-am", "v2", cwd=work)
    bare = tmp_path / "repo.git"
    git("clone", "-q", "--bare", str(work), str(bare), cwd=tmp_path)
    return bare, sha


@needs_git
async def test_git_fetcher_tag_and_cache(tmp_path: Path, bare_repo: tuple[Path, str]) -> None:
    bare, _ = bare_repo
    fetcher = GitFetcher(tmp_path / "cache", local=True)
    first = await fetcher.fetch(f"file://{bare}", "v1")
    assert "exec:\n  command: [echo]" in (first / "step.yml").read_text()
    assert await fetcher.fetch(f"file://{bare}", "v1") == first
    latest = await fetcher.fetch(f"file://{bare}", "main")
    assert "[v2]" in (latest / "step.yml").read_text()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]


@needs_git
async def test_git_fetcher_commit_sha(tmp_path: Path, bare_repo: tuple[Path, str]) -> None:
    bare, sha = bare_repo
    checkout = await GitFetcher(tmp_path / "cache", local=True).fetch(f"file://{bare}", sha)
    assert "[echo]" in (checkout / "step.yml").read_text()


@needs_git
async def test_git_fetcher_unknown_rev(tmp_path: Path, bare_repo: tuple[Path, str]) -> None:
    bare, _ = bare_repo
    with pytest.raises(FetchError, match="failed"):
        await GitFetcher(tmp_path / "cache", local=True).fetch(f"file://{bare}", "no-such-tag")


async def test_git_fetcher_without_git(tmp_path: Path) -> None:
    fetcher = GitFetcher(tmp_path / "cache", git="/nonexistent/git", local=True)
    with pytest.raises(FetchError, match="install git"):
        await fetcher.fetch("file:///x.git", "v1")


@needs_git
async def test_git_reference_resolves_and_checks(
    tmp_path: Path, bare_repo: tuple[Path, str], write_step: WriteStep
) -> None:
    bare, _ = bare_repo
    main = write_step(
        "main/step.yml",
        f"""
        spec:
        ---
        run:
          - name: echo
            step: file://{bare}/-/steps/echo@v1
            inputs: {{msg: hi}}
          - name: root
            step:
              git: {{url: "file://{bare}", rev: v1}}
          - name: use
            script: echo ${{{{ steps.echo.outputs.said }}}} ${{{{ steps.root.outputs.out }}}}
        """,
    )
    fetcher = GitFetcher(tmp_path / "cache", local=True)
    resolved = await Resolver(fetcher=fetcher).resolve(main)
    echo = resolved.children["echo"]
    assert echo is not None
    assert echo.key.endswith("steps/echo/func.yml")
    assert await check_files_async([main], fetcher=fetcher) == []


async def test_git_reference_without_fetcher(write_step: WriteStep) -> None:
    main = write_step("m/step.yml", "spec:\n---\nrun:\n  - name: a\n    step: example.com/r@v1\n")
    with pytest.raises(StepReferenceError, match="no fetcher is configured"):
        await Resolver().resolve(main)
