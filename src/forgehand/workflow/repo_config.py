"""A repository's own configuration: `.forgehand/config.yml`, read from the default branch.

```yaml
setup:                      # commands run in the sandbox before the baseline, in order
  - pip install -e .
test:
  command: python -m pytest -rA
protected_paths:            # added to the defaults (CI configuration, .forgehand/)
  - deploy/**
budgets: {max_steps: 30, max_cost_usd: 2.0, max_seconds: 1800}
limits: {max_changed_files: 50, max_diff_bytes: 500000}
network:                    # the sandbox reaches the package registries plus these hosts
  allow: [git.example.com, '*.example.org']
  read_only: false          # true: only GET, HEAD, OPTIONS over plain http; https refused
image: node:20              # run on this container image, one the operator allows
```

`image` names a container image already on the forgehand host (never pulled) whose file
system the sandbox runs on, for a toolchain the host lacks. It needs bash and git (setup
and test commands run in bash; the result is committed and bundled with git in the
sandbox), and the operator must allow it (`forgehand solve --allow-image PATTERN`).

Without the file, common projects are detected from the default branch's file list:
Python with pytest (`python -m pytest -rA`) and Node (`npm test`). Nothing detected means
no test command: the run then says that nothing was verified.
"""

from __future__ import annotations

import json
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from forgehand.agent.budget import Budgets
from forgehand.sandbox.spec import ProxyNetwork

CONFIG_PATH = ".forgehand/config.yml"
DEFAULT_PROTECTED = (".gitlab-ci.yml", ".github/workflows/**", ".forgehand/**")
PYTEST_COMMAND = "python -m pytest -rA -p no:cacheprovider"
_PYTHON_MARKERS = ("pytest.ini", "conftest.py", "tox.ini", "setup.cfg")


class RepoConfigError(Exception):
    """`.forgehand/config.yml` is invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TestCommand(_Strict):
    """How the harness runs the tests."""

    command: str = Field(min_length=1, description="shell command run in the repository root")
    timeout_seconds: float = Field(default=900.0, gt=0, description="kill the tests after this")


class RepoBudgets(_Strict):
    """Caps on the agent; the operator's own limits apply too (the smaller one wins)."""

    max_steps: int | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    max_cost_usd: float | None = Field(default=None, gt=0)
    max_seconds: float | None = Field(default=None, gt=0)


class SizeLimits(_Strict):
    """What a change may be at most before publishing is refused."""

    max_changed_files: int = Field(default=100, gt=0)
    max_diff_bytes: int = Field(default=1_000_000, gt=0)
    max_file_bytes: int = Field(default=1_000_000, gt=0)


class RepoNetwork(_Strict):
    """What the sandbox may reach (through the egress proxy), besides the package
    registries it may always reach, and how: with `read_only: true` the proxy lets only
    GET, HEAD and OPTIONS through, over plain http. It then refuses https (CONNECT) too,
    registries included, because it cannot see the methods inside a TLS tunnel."""

    allow: tuple[str, ...] = Field(
        default=(), description="extra hosts: `example.com`, `*.example.com` or an IP"
    )
    read_only: bool = Field(
        default=False, description="only GET, HEAD, OPTIONS over plain http; https refused"
    )

    @field_validator("allow")
    @classmethod
    def _hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        from forgehand.sandbox.egress.config import AllowRule

        for host in hosts:
            AllowRule(host=host)  # raises with the reason for a malformed host
        return hosts


class RepoConfig(_Strict):
    """The whole file; every field is optional."""

    version: Literal[1] = 1
    setup: tuple[str, ...] = ()
    test: TestCommand | None = None
    protected_paths: tuple[str, ...] = ()
    budgets: RepoBudgets = RepoBudgets()
    limits: SizeLimits = SizeLimits()
    network: RepoNetwork = RepoNetwork()
    image: str | None = Field(
        default=None, description="a local container image the sandbox runs on (never pulled)"
    )

    @field_validator("image")
    @classmethod
    def _image_name(cls, name: str | None) -> str | None:
        from forgehand.sandbox.spec import image_name

        return None if name is None else image_name(name)

    def sandbox_network(self) -> ProxyNetwork:
        """The sandbox's network: the egress proxy with the registries plus `network.allow`,
        read-only when `network.read_only` says so."""
        from forgehand.sandbox.egress.config import DEFAULT_ALLOW

        hosts = dict.fromkeys([*(rule.host for rule in DEFAULT_ALLOW), *self.network.allow])
        return ProxyNetwork(allow_hosts=tuple(hosts), read_only_methods=self.network.read_only)

    @property
    def all_protected(self) -> tuple[str, ...]:
        return DEFAULT_PROTECTED + self.protected_paths


class ResolvedConfig(_Strict):
    """The configuration in force, and where it came from."""

    config: RepoConfig
    source: Literal["file", "detected", "none"]
    detail: str


def parse_repo_config(text: str) -> RepoConfig:
    """Validate the text of `.forgehand/config.yml`."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RepoConfigError(f"{CONFIG_PATH} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RepoConfigError(f"{CONFIG_PATH} must be a mapping at the top")
    try:
        return RepoConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise RepoConfigError(f"{CONFIG_PATH} on the default branch: {problems}") from None


def detect(files: list[str], package_json: str | None) -> ResolvedConfig:
    """Configuration for a repository without the file, from its file list."""
    names = {f.rsplit("/", 1)[-1] for f in files}
    if _is_python_with_tests(files, names):
        config = RepoConfig(test=TestCommand(command=PYTEST_COMMAND))
        return ResolvedConfig(config=config, source="detected", detail="Python project (pytest)")
    if package_json is not None and _has_npm_test(package_json):
        config = RepoConfig(test=TestCommand(command="npm test"))
        return ResolvedConfig(config=config, source="detected", detail="Node project (npm test)")
    return ResolvedConfig(
        config=RepoConfig(),
        source="none",
        detail=f"no {CONFIG_PATH} and no test command detected (Python/pytest, Node/npm)",
    )


def _is_python_with_tests(files: list[str], names: set[str]) -> bool:
    if names & set(_PYTHON_MARKERS) and any(f.endswith(".py") for f in files):
        return True
    return any(_is_python_test(f) for f in files)


def _is_python_test(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.endswith(".py") and (name.startswith("test_") or name.endswith("_test.py"))


def _has_npm_test(text: str) -> bool:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return False
    scripts = data.get("scripts") if isinstance(data, dict) else None
    test = scripts.get("test") if isinstance(scripts, dict) else None
    return isinstance(test, str) and "no test specified" not in test


def effective_budgets(repo: RepoBudgets, operator: Budgets) -> Budgets:
    """The smaller of each limit the repository and the operator set."""

    def smaller(a: float | None, b: float | None) -> float | None:
        given = [v for v in (a, b) if v is not None]
        return min(given) if given else None

    steps = smaller(repo.max_steps, operator.max_steps)
    tokens = smaller(repo.max_tokens, operator.max_tokens)
    return Budgets(
        max_steps=int(steps) if steps is not None else None,
        max_tokens=int(tokens) if tokens is not None else None,
        max_cost_usd=smaller(repo.max_cost_usd, operator.max_cost_usd),
        max_seconds=smaller(repo.max_seconds, operator.max_seconds),
    )
