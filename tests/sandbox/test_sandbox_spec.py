"""SandboxSpec validation: sizes, paths, network opt-in, field names in errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from forgehand.sandbox.spec import ProxyNetwork, SandboxSpec, parse_size


def _spec(**extra: Any) -> SandboxSpec:
    return SandboxSpec.model_validate({"work_dir": {"host_path": "/srv/work"}, **extra})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512M", 512 << 20), ("1G", 1 << 30), ("1.5GiB", 3 << 29), ("64k", 65536), ("4096", 4096)],
)
def test_sizes_parse(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_defaults_are_closed() -> None:
    spec = _spec()
    assert spec.network.mode == "none"
    assert spec.env == {}
    assert spec.root.type == "host"
    assert spec.work_dir_bytes == spec.limits.disk_bytes


def test_spec_is_frozen() -> None:
    spec = _spec()
    with pytest.raises(ValidationError):
        setattr(spec, "isolation", "kernel")  # noqa: B010


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"limits": {"memory_bytes": "lots"}}, "memory_bytes"),
        ({"limits": {"pids": 0}}, "pids"),
        ({"limits": {"cpu_cores": -1}}, "cpu_cores"),
        ({"limits": {"wall_time_seconds": 0}}, "wall_time_seconds"),
        ({"limits": {"cpu_cores": "inf"}}, "cpu_cores"),
        ({"limits": {"wall_time_seconds": float("nan")}}, "wall_time_seconds"),
        ({"root": {"type": "dir", "path": "relative/root"}}, "path"),
        ({"root": {"type": "dir", "path": "/"}}, "path"),
        ({"root": {"type": "image", "name": "--privileged"}}, "name"),
        ({"root": {"type": "image", "name": "debian 12"}}, "name"),
        ({"root": {"type": "image"}}, "name"),
        ({"ro_mounts": [{"source": "relative/dir"}]}, "source"),
        ({"ro_mounts": [{"source": "/opt/../root"}]}, "source"),
        ({"ro_mounts": [{"source": "/opt", "target": "/proc/x"}]}, "target"),
        ({"ro_mounts": [{"source": "/proc/self"}]}, "target"),  # the source's path
        ({"ro_mounts": [{"source": "/opt", "target": "/"}]}, "own /"),
        # The runner's socket and journals, which a mount at /run would cover too.
        ({"ro_mounts": [{"source": "/opt", "target": "/run/forgehand"}]}, "runner's /run"),
        ({"ro_mounts": [{"source": "/opt", "target": "/run"}]}, "cover the runner's /run"),
        ({"ro_mounts": [{"source": "/opt", "target": "/work"}]}, "cover the work dir"),
        (
            {
                "ro_mounts": [{"source": "/srv", "target": "/opt"}],
                "root": {"type": "dir", "path": "/srv/root"},
            },
            "cover the runner's /opt/forgehand",
        ),
        ({"network": {"mode": "open"}}, "unsafe_allow_open_network"),
        ({"network": {"mode": "proxy", "allow_hosts": ["Not A Host"]}}, "allow_hosts"),
        ({"network": {"mode": "carrier-pigeon"}}, "network"),
        ({"isolation": "vm"}, "isolation"),
        ({"env": {"BAD-NAME": "x"}}, "env"),
        ({"unknown_field": 1}, "unknown_field"),
        (
            {"work_dir": {"host_path": "/w", "size_bytes": "2G"}, "limits": {"disk_bytes": "1G"}},
            "work_dir.size_bytes",
        ),
    ],
)
def test_invalid_specs_name_the_field(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        _spec(**extra)


def test_open_network_needs_explicit_opt_in() -> None:
    spec = _spec(network={"mode": "open", "unsafe_allow_open_network": True})
    assert spec.network.mode == "open"


def test_mounts_may_go_where_neither_the_sandbox_nor_the_runner_lives() -> None:
    allowed = [{"source": "/srv/tools", "target": p} for p in ("/work/sub", "/run/x", "/tmp/t")]
    assert len(_spec(ro_mounts=allowed).ro_mounts) == 3
    # /opt/forgehand is the runner's only on a custom root: the host root leaves /opt free.
    assert _spec(ro_mounts=[{"source": "/opt"}]).ro_mounts[0].destination == Path("/opt")


def test_mount_target_defaults_to_source() -> None:
    spec = _spec(ro_mounts=[{"source": "/opt/tools"}])
    assert spec.ro_mounts[0].destination == Path("/opt/tools")


def test_proxy_read_only_methods_is_off_by_default_and_strict() -> None:
    proxy = {"mode": "proxy", "allow_hosts": ["pypi.org"]}
    default, read_only = _spec(network=proxy), _spec(network={**proxy, "read_only_methods": True})
    assert isinstance(default.network, ProxyNetwork)
    assert isinstance(read_only.network, ProxyNetwork)
    assert (default.network.read_only_methods, read_only.network.read_only_methods) == (False, True)
    with pytest.raises(ValidationError, match="read_only_methods"):
        _spec(network={**proxy, "read_only_methods": "sometimes"})
    with pytest.raises(ValidationError, match="read_only_methods"):
        _spec(network={"mode": "none", "read_only_methods": True})


@pytest.mark.parametrize(
    "name",
    ["debian:12", "localhost/app:1", "registry.example.org:5000/team/app@sha256:" + "a" * 64],
)
def test_image_roots_take_image_names(name: str) -> None:
    assert _spec(root={"type": "image", "name": name}).root.type == "image"
