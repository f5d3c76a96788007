"""Run a fake forge for demos: `python -m forgehand.forge.fakes gitlab|github --token T`."""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

from forgehand.forge.fakes._server import FakeForgeServer
from forgehand.forge.fakes.github_server import FakeGitHub
from forgehand.forge.fakes.gitlab_server import FakeGitLab


def _build(kind: str, root: Path, token: str, project: str) -> FakeForgeServer:
    if kind == "gitlab":
        gitlab = FakeGitLab(root, token)
        gitlab.add_project(project)
        gitlab.add_issue(project, "Example issue", "Created by the fake GitLab.")
        return gitlab
    github = FakeGitHub(root, token)
    github.add_repo(project)
    github.add_issue(project, "Example issue", "Created by the fake GitHub.")
    return github


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=["gitlab", "github"])
    parser.add_argument("--token", required=True, help="the token clients must present")
    parser.add_argument("--project", default="demo/app", help="project to create")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fake-forge-") as root:
        fake = _build(args.kind, Path(root), args.token, args.project)
        with fake:
            print(f"fake {args.kind} serving {args.project} at {fake.url}", flush=True)
            threading.Event().wait()


if __name__ == "__main__":
    main()
