"""``forgehand local …``: the embedded local forge (bare repositories + SQLite records).

forgehand local repo init PATH
forgehand local issue create --repo PATH --title T --body B     # prints local:PATH#N
forgehand local mr list [--repo PATH] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from forgehand.forge.errors import ForgeError


def add_home(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home",
        type=Path,
        help="state directory (default $FORGEHAND_HOME or ~/.local/share/forgehand)",
    )


def register(commands: Any) -> None:
    local = commands.add_parser("local", help="the local forge: repositories, issues, MRs")
    sub = local.add_subparsers(dest="local_command", required=True, metavar="COMMAND")

    repo = sub.add_parser("repo", help="bare repositories").add_subparsers(
        dest="repo_command", required=True, metavar="COMMAND"
    )
    init = repo.add_parser("init", help="create a bare repository for the local forge")
    init.add_argument("path", type=Path)
    init.add_argument("--default-branch", default="main")
    init.set_defaults(handler=_repo_init)

    issue = sub.add_parser("issue", help="issues").add_subparsers(
        dest="issue_command", required=True, metavar="COMMAND"
    )
    create = issue.add_parser("create", help="open an issue; prints local:PATH#N")
    create.add_argument("--repo", type=Path, required=True, help="the bare repository")
    create.add_argument("--title", required=True)
    create.add_argument("--body", default="")
    create.add_argument("--author", help="user name (default: the bot user)")
    add_home(create)
    create.set_defaults(handler=_issue_create)

    mr = sub.add_parser("mr", help="merge requests").add_subparsers(
        dest="mr_command", required=True, metavar="COMMAND"
    )
    listing = mr.add_parser("list", help="list merge requests")
    listing.add_argument("--repo", type=Path, help="only this repository")
    listing.add_argument("--json", action="store_true", help="JSON lines")
    add_home(listing)
    listing.set_defaults(handler=_mr_list)


def _home(args: argparse.Namespace) -> Any:
    from forgehand.workflow.app import Home

    return Home(args.home) if args.home else Home.default()


def _fail(message: str) -> int:
    print(f"forgehand local: {message}", file=sys.stderr)
    return 2


def _repo_init(args: argparse.Namespace) -> int:
    from forgehand.forge.local import init_repo

    try:
        path = asyncio.run(init_repo(args.path, args.default_branch))
    except ForgeError as exc:
        return _fail(str(exc))
    print(path)
    return 0


def _issue_create(args: argparse.Namespace) -> int:
    from forgehand.forge.local import create_issue

    config = _home(args).local_forge()
    try:
        ref = asyncio.run(
            create_issue(config, args.repo, args.title, args.body, author=args.author)
        )
    except ForgeError as exc:
        return _fail(str(exc))
    print(ref)
    return 0


def _mr_list(args: argparse.Namespace) -> int:
    from forgehand.forge.local import list_all_merge_requests, list_merge_requests

    config = _home(args).local_forge()
    try:
        if args.repo is not None:
            mrs = asyncio.run(list_merge_requests(config, args.repo.absolute()))
        else:
            mrs = asyncio.run(list_all_merge_requests(config))
    except ForgeError as exc:
        return _fail(str(exc))
    for mr in mrs:
        if args.json:
            print(json.dumps(dataclasses.asdict(mr) | {"state": mr.state.value}))
        else:
            draft = "draft " if mr.draft else ""
            print(
                f"local:{mr.repo}!{mr.number}\t{draft}{mr.state.value}\t{mr.source_branch}"
                f" → {mr.target_branch}\t{mr.title}"
            )
    return 0
