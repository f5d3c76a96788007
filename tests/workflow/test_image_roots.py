"""A repository runs on its own container image (`image:` in .forgehand/config.yml), when
the operator allows it; the run checks the image has what it needs."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgehand.agent.replay import ReplayServer
from forgehand.workflow.engine import WorkflowOptions
from forgehand.workflow.model import Outcome, Phase, RunEnded
from forgehand.workflow.repo_config import RepoConfigError, parse_repo_config

from .conftest import FINISH, REPLAY_KEY, git, repo_scenario, run_cli, scripted, turn

TOOLS_IMAGE = "localhost/fh-wf-tools:1"
BARE_IMAGE = "localhost/fh-wf-bare:1"
RELEASE = "ID=fhtools\n"
# The test command proves where it ran: the image's os-release, not the host's.
CONFIG = f"""image: {TOOLS_IMAGE}
test:
  command: grep -q fhtools /etc/os-release && grep -q 'page - 1' page.txt
"""
FIX = turn(
    "edit_file",
    path="page.txt",
    old_text="start = page * per_page\n",
    new_text="start = (page - 1) * per_page\n",
)

needs_images = pytest.mark.skipif(
    shutil.which("bwrap") is None or shutil.which("podman") is None or os.geteuid() != 0,
    reason="needs root, bubblewrap and podman (images come from podman's local store)",
)


def _libraries(program: str) -> set[Path]:
    listing = subprocess.run(["ldd", program], capture_output=True, text=True, check=True)
    found = set()
    for line in listing.stdout.splitlines():
        path = line.split("=>")[-1].split("(")[0].strip()
        if path.startswith("/"):
            found.add(Path(path))
    return found


@contextlib.contextmanager
def local_image(name: str, programs: dict[str, str]) -> Iterator[str]:
    """A local podman image (`podman import`, nothing pulled) holding host `programs`
    (host path → path in the image) and their libraries; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="fh-wf-image-", dir="/tmp") as scratch:
        root = Path(scratch) / "root"
        for source, target in programs.items():
            for path, library in [(target, Path(source))] + [
                (str(lib), lib) for lib in _libraries(source)
            ]:
                destination = root / path.lstrip("/")
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.realpath(library), destination)
        (root / "etc").mkdir()
        (root / "etc" / "os-release").write_text(RELEASE)
        for path in (root, *root.rglob("*")):
            path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
        archive = subprocess.run(
            ["tar", "-C", str(root), "-c", "."], capture_output=True, check=True
        )
    subprocess.run(
        ["podman", "import", "-", name], input=archive.stdout, capture_output=True, check=True
    )
    try:
        yield name
    finally:
        subprocess.run(["podman", "rmi", "--force", name], capture_output=True, check=False)


TOOLS = {
    "/bin/bash": "/bin/bash",
    "/bin/dash": "/bin/sh",
    "/bin/grep": "/bin/grep",
    "/bin/cat": "/bin/cat",
    "/usr/bin/git": "/usr/bin/git",
    "/usr/lib/git-core/git": "/usr/lib/git-core/git",  # git runs its helpers from here
}


def test_the_repository_image_is_validated() -> None:
    assert parse_repo_config("image: node:20\n").image == "node:20"
    assert parse_repo_config("").image is None
    with pytest.raises(RepoConfigError, match=r"image: .*not an image name"):
        parse_repo_config("image: '--privileged'\n")


def test_the_root_is_the_operators_unless_the_repository_names_an_allowed_image() -> None:
    operator = {"type": "image", "name": "debian:12"}
    options = WorkflowOptions(
        sandbox="bwrap", home=Path("/nonexistent"), root=operator, allowed_images=("node:*",)
    )
    assert options.root_for(None) == operator
    assert options.root_for("node:20") == {"type": "image", "name": "node:20"}
    assert options.root_for("debian:12") == operator  # the operator's own image
    with pytest.raises(RunEnded, match=r"--allow-image localhost/x:1") as refused:
        options.root_for("localhost/x:1")
    assert refused.value.outcome is Outcome.CONFIG_ERROR
    unsandboxed = WorkflowOptions(sandbox="none", home=Path("/nonexistent"), allowed_images=("*",))
    with pytest.raises(RunEnded, match=r"without a sandbox") as refused:
        unsandboxed.root_for("node:20")
    assert refused.value.outcome is Outcome.CONFIG_ERROR
    assert WorkflowOptions(sandbox="bwrap", home=Path("/x")).root_for(None) is None


async def test_an_image_the_operator_does_not_allow_ends_the_run_before_any_sandbox(
    short_tmp: Path,
) -> None:
    scenario = await repo_scenario(short_tmp, {".forgehand/config.yml": "image: evil:1\n"})
    async with scenario.workflow(scripted(FINISH), sandbox="bwrap", allowed_images=("node:*",)) as (
        workflow,
        _,
    ):
        record = await workflow.solve(scenario.ref)
    assert record.outcome is Outcome.CONFIG_ERROR, record.message
    assert "--allow-image evil:1" in record.message
    assert "allowed: node:*" in record.message
    assert Phase.AGENT not in record.outputs


@needs_images
async def test_a_run_on_the_repositorys_image_ends_in_a_verified_draft_mr(
    short_tmp: Path,
) -> None:
    files = {".forgehand/config.yml": CONFIG, "page.txt": "start = page * per_page\n"}
    scenario = await repo_scenario(short_tmp, files)
    with local_image(TOOLS_IMAGE, TOOLS):
        async with scenario.workflow(
            scripted(FIX, FINISH), sandbox="bwrap", allowed_images=("localhost/fh-wf-*",)
        ) as (workflow, _):
            record = await workflow.solve(scenario.ref)
    assert record.outcome is Outcome.DONE, record.message
    assert f"root image {TOOLS_IMAGE}" in record.outputs[Phase.SETUP]["detail"]  # `show`
    verification = record.outputs[Phase.VERIFY]["verification"]
    assert verification["before"]["exit_code"] != 0  # the baseline ran on the image too
    assert verification["after"]["exit_code"] == 0
    (mr,) = await scenario.forge.list_merge_requests()
    assert (
        f"- sandbox: bwrap sandbox, isolation process, network proxy, root image {TOOLS_IMAGE}"
        in (mr.description)
    )
    branch = mr.source_branch
    assert git(scenario.bare, "show", f"{branch}:page.txt") == "start = (page - 1) * per_page"
    assert git(scenario.bare, "log", "-1", "--format=%an", branch) == "forgehand[bot]"


@needs_images
async def test_an_image_without_git_ends_the_run_saying_what_it_lacks(short_tmp: Path) -> None:
    files = {".forgehand/config.yml": f"image: {BARE_IMAGE}\n"}
    scenario = await repo_scenario(short_tmp, files)
    with local_image(BARE_IMAGE, {"/bin/bash": "/bin/bash"}):
        async with scenario.workflow(
            scripted(FINISH), sandbox="bwrap", root={"type": "image", "name": BARE_IMAGE}
        ) as (workflow, _):
            record = await workflow.solve(scenario.ref)
    assert record.outcome is Outcome.SETUP_FAILED, record.message
    assert f"the image {BARE_IMAGE!r} lacks bash or git" in record.message
    assert Phase.AGENT not in record.outputs


@needs_images
async def test_solve_cli_passes_the_operators_allowed_images_on(short_tmp: Path) -> None:
    """The same run from `forgehand solve`: its --allow-image reaches the workflow (and
    without it, the same repository is refused)."""
    files = {".forgehand/config.yml": CONFIG, "page.txt": "start = page * per_page\n"}
    scenario = await repo_scenario(short_tmp, files)
    argv = [
        *("solve", str(scenario.ref), "--provider", "anthropic", "--model", "m"),
        *("--sandbox", "bwrap", "--home", str(scenario.home.root)),
    ]
    env = {"ANTHROPIC_API_KEY": REPLAY_KEY}
    with local_image(TOOLS_IMAGE, TOOLS):
        async with ReplayServer(scripted(FIX, FINISH)) as server:
            code, _, err = await run_cli(short_tmp, *argv, "--base-url", server.base_url, env=env)
            assert code == 1, err
            assert "config_error" in err, err
            assert f"--allow-image {TOOLS_IMAGE}" in err
            allowed = ("--allow-image", "localhost/fh-wf-*")
            code, out, err = await run_cli(
                short_tmp, *argv, *allowed, "--base-url", server.base_url, env=env
            )
    assert code == 0, err
    assert f"root image {TOOLS_IMAGE}" in err  # the progress names the sandbox's root
    assert "draft MR: local:" in out
