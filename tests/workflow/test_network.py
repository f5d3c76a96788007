"""The workflow's sandboxes reach the network only through the egress proxy."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from forgehand.workflow.model import Outcome, Phase
from forgehand.workflow.repo_config import RepoConfigError, parse_repo_config

from .conftest import FINISH, repo_scenario, scripted

BLOCKED_HOST = "blocked.forgehand.test"  # refused by name: never resolved, never contacted
FETCH = (
    'python3 -c "import urllib.request; '
    f"urllib.request.urlopen('http://{BLOCKED_HOST}/simple/', timeout=10)\""
)
HTTPS_FETCH = (
    'python3 -c "import urllib.request; '
    "urllib.request.urlopen('https://pypi.org/simple/', timeout=10)\""
)


def test_network_allow_takes_hosts_and_refuses_garbage() -> None:
    config = parse_repo_config("network: {allow: [git.example.com, '*.example.org']}\n")
    hosts = config.sandbox_network().allow_hosts
    assert "pypi.org" in hosts  # the registries stay allowed
    assert hosts[-2:] == ("git.example.com", "*.example.org")
    with pytest.raises(RepoConfigError):
        parse_repo_config("network: {allow: ['http://not a host/']}\n")


def test_network_read_only_reaches_the_sandbox_network_and_is_off_by_default() -> None:
    assert parse_repo_config("").sandbox_network().read_only_methods is False
    config = parse_repo_config("network: {allow: [git.example.com], read_only: true}\n")
    network = config.sandbox_network()
    assert network.read_only_methods is True
    assert network.allow_hosts[-1] == "git.example.com"
    with pytest.raises(RepoConfigError, match=r"network\.read_only"):
        parse_repo_config("network: {read_only: sometimes}\n")
    with pytest.raises(RepoConfigError, match=r"network\.readonly"):
        parse_repo_config("network: {readonly: true}\n")


@pytest.mark.skipif(
    shutil.which("bwrap") is None or os.geteuid() != 0,
    reason="needs root and the `bubblewrap` package (the proxy exists in real sandboxes)",
)
@pytest.mark.parametrize(
    ("config", "host", "remedy"),
    [
        pytest.param(f"setup:\n  - {FETCH}\n", BLOCKED_HOST, "network.allow", id="not-allowed"),
        # CONNECT is refused in read-only mode before any name is resolved: nothing leaves.
        pytest.param(
            f"network: {{read_only: true}}\nsetup:\n  - {HTTPS_FETCH}\n",
            "pypi.org",
            "network.read_only: true",
            id="read-only",
        ),
    ],
)
async def test_setup_refused_by_the_proxy_ends_as_blocked_network(
    short_tmp: Path, config: str, host: str, remedy: str
) -> None:
    scenario = await repo_scenario(short_tmp, {".forgehand/config.yml": config})
    async with scenario.workflow(scripted(FINISH), sandbox="bwrap") as (workflow, _):
        record = await workflow.solve(scenario.ref)
    assert record.outcome is Outcome.BLOCKED_NETWORK, record.message
    assert host in record.message
    assert remedy in record.message
    assert Phase.AGENT not in record.outputs
