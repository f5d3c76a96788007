"""The workflow's sandboxes reach the network only through the egress proxy."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from forgehand.forge.base import ForgeKind, ProjectRef
from forgehand.forge.local import LocalForge, create_issue, init_repo
from forgehand.workflow.app import Home
from forgehand.workflow.model import Outcome, Phase
from forgehand.workflow.repo_config import RepoConfigError, parse_repo_config

from .conftest import FINISH, Scenario, git, scripted

BLOCKED_HOST = "blocked.forgehand.test"  # refused by name: never resolved, never contacted
FETCH = (
    'python3 -c "import urllib.request; '
    f"urllib.request.urlopen('http://{BLOCKED_HOST}/simple/', timeout=10)\""
)


def test_network_allow_takes_hosts_and_refuses_garbage() -> None:
    config = parse_repo_config("network: {allow: [git.example.com, '*.example.org']}\n")
    hosts = config.sandbox_network().allow_hosts
    assert "pypi.org" in hosts  # the registries stay allowed
    assert hosts[-2:] == ("git.example.com", "*.example.org")
    with pytest.raises(RepoConfigError):
        parse_repo_config("network: {allow: ['http://not a host/']}\n")


@pytest.mark.skipif(
    shutil.which("bwrap") is None or os.geteuid() != 0,
    reason="needs root and the `bubblewrap` package (the proxy exists in real sandboxes)",
)
async def test_setup_refused_by_the_proxy_ends_as_blocked_network(short_tmp: Path) -> None:
    home = Home(short_tmp / "home")
    bare = await init_repo(short_tmp / "app.git")
    seed = short_tmp / "seed"
    git(short_tmp, "init", "-q", "-b", "main", str(seed))
    (seed / ".forgehand").mkdir()
    (seed / ".forgehand" / "config.yml").write_text(f"setup:\n  - {FETCH}\n")
    git(seed, "add", "-A")
    git(seed, "-c", "user.name=A", "-c", "user.email=a@x.invalid", "commit", "-qm", "init")
    git(seed, "push", "-q", str(bare), "main")
    ref = await create_issue(home.local_forge(), bare, "Add a feature", "x", author="alice")
    forge = LocalForge(home.local_forge(), ProjectRef(ForgeKind.LOCAL, "", str(bare)))
    scenario = Scenario(short_tmp, home, ref, forge)
    async with scenario.workflow(scripted(FINISH), sandbox="bwrap") as (workflow, _):
        record = await workflow.solve(ref)
    assert record.outcome is Outcome.BLOCKED_NETWORK, record.message
    assert BLOCKED_HOST in record.message
    assert "network.allow" in record.message
    assert Phase.AGENT not in record.outputs
