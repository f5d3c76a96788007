"""The operator's trusted networks ($FORGEHAND_TRUSTED_NETWORKS) reach every sandbox's egress
proxy; a repository cannot set them, and loopback or metadata addresses are refused."""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

import pytest

from forgehand.sandbox.egress.config import TRUSTED_NETWORKS_ENV, operator_trusted_networks
from forgehand.sandbox.errors import SandboxLaunchError
from forgehand.sandbox.gvisor import GVisorConfig
from forgehand.sandbox.rootfs import start_egress
from forgehand.sandbox.spec import ProxyNetwork


def test_parsed_from_commas_and_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRUSTED_NETWORKS_ENV, "203.0.113.80/32, 10.20.0.0/16  fd00::/64")
    assert operator_trusted_networks() == (
        ip_network("203.0.113.80/32"),
        ip_network("10.20.0.0/16"),
        ip_network("fd00::/64"),
    )


def test_unset_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRUSTED_NETWORKS_ENV, raising=False)
    assert operator_trusted_networks() == ()


@pytest.mark.parametrize("bad", ["mirror.internal", "10.0.0.1/33", "10.0.0.1/8"])
def test_a_bad_entry_is_named(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(TRUSTED_NETWORKS_ENV, f"203.0.113.80/32,{bad}")
    with pytest.raises(ValueError, match=f"{TRUSTED_NETWORKS_ENV}: '{bad}' is not a network"):
        operator_trusted_networks()


async def test_every_sandbox_proxy_trusts_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(TRUSTED_NETWORKS_ENV, "203.0.113.80/32")
    config = GVisorConfig(trusted_networks=(ip_network("198.51.100.0/24"),))
    network = ProxyNetwork(allow_hosts=("pypi.org",))
    owner = (0, 0)
    proxy = await start_egress(tmp_path, network, config, owner=owner)
    try:
        assert proxy.config.trusted_networks == (
            ip_network("198.51.100.0/24"),
            ip_network("203.0.113.80/32"),
        )
    finally:
        await proxy.stop()


@pytest.mark.parametrize("unsafe", ["127.0.0.0/8", "169.254.0.0/16"])
async def test_loopback_and_metadata_are_never_trusted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, unsafe: str
) -> None:
    monkeypatch.setenv(TRUSTED_NETWORKS_ENV, unsafe)
    network = ProxyNetwork(allow_hosts=("pypi.org",))
    with pytest.raises(SandboxLaunchError, match="never trusted"):
        await start_egress(tmp_path, network, GVisorConfig(), owner=(0, 0))
