"""A fake GitHub (REST API, GitHub Enterprise layout) for the endpoints the adapter uses.

The API lives under `/api/v3` like GitHub Enterprise Server; repositories are served
for git at `http://HOST/OWNER/REPO.git`. Auth: `Authorization: token|Bearer TOKEN`.
Errors: `{"message": ..., "documentation_url": ..., "status": "404"}`. Issues and
pull requests share one number sequence, as on GitHub. Shapes follow
docs.github.com/rest and validate against githubkit's models.
"""

from __future__ import annotations

import hmac
import itertools
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from forgehand.forge.fakes._server import (
    FakeForgeServer,
    HttpError,
    Json,
    Reply,
    Request,
    branch_exists,
    branch_sha,
    init_bare_repo,
    paginate,
)

DOCS = "https://docs.github.com/rest"
_MESSAGES = {
    401: "Bad credentials",
    403: "Resource not accessible by personal access token",
    404: "Not Found",
    405: "Method Not Allowed",
    422: "Validation Failed",
    429: "You have exceeded a secondary rate limit. Please wait a few minutes and try again.",
    500: "Server Error",
    502: "Server Error",
    503: "Service Unavailable",
}
_REACTIONS = frozenset({"+1", "-1", "laugh", "confused", "heart", "hooray", "rocket", "eyes"})
_PERMISSIONS = {
    "admin": "admin",
    "maintain": "write",
    "write": "write",
    "triage": "read",
    "read": "read",
}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class GitHubRepo:
    id: int
    owner: str
    name: str
    default_branch: str
    repo: Path
    private: bool = True
    collaborators: dict[str, str] = field(default_factory=dict)
    issues: dict[int, Json] = field(default_factory=dict)
    comments: dict[int, list[Json]] = field(default_factory=dict)
    reactions: dict[int, list[Json]] = field(default_factory=dict)
    pulls: dict[int, Json] = field(default_factory=dict)
    next_number: int = 1

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


class FakeGitHub(FakeForgeServer):
    """In-memory GitHub; seed it with `add_user`, `add_repo`, `add_issue`, `add_comment`."""

    api_prefix = "/api/v3"

    def __init__(self, git_root: Path, token: str, *, bot_login: str = "forgehand-bot") -> None:
        super().__init__(git_root, token)
        self._ids = itertools.count(1000)
        self.users: dict[str, Json] = {}
        self.repos: dict[str, GitHubRepo] = {}
        self.bot = self.add_user(bot_login)
        self._register_routes()

    @property
    def api_url(self) -> str:
        return self.url + self.api_prefix

    def _register_routes(self) -> None:
        r = r"/repos/([^/]+)/([^/]+)"
        self.route("GET", r, self._get_repo)
        self.route("GET", r + r"/issues/(\d+)", self._get_issue)
        self.route("GET", r + r"/issues/(\d+)/comments", self._list_comments)
        self.route("POST", r + r"/issues/(\d+)/comments", self._create_comment)
        self.route("POST", r + r"/issues/(\d+)/reactions", self._create_reaction)
        self.route("GET", r + r"/collaborators/([^/]+)/permission", self._get_permission)
        self.route("GET", r + r"/pulls", self._list_pulls)
        self.route("POST", r + r"/pulls", self._create_pull)
        self.route("GET", r + r"/pulls/(\d+)", self._get_pull)
        self.route("PATCH", r + r"/pulls/(\d+)", self._update_pull)

    # seeding

    def add_user(self, login: str) -> Json:
        with self.lock:
            user_id = next(self._ids)
            api, web = self.api_url, self.url
            self.users[login] = {
                "login": login,
                "id": user_id,
                "node_id": f"U_kgDO{user_id}",
                "avatar_url": f"{web}/avatars/u/{user_id}",
                "gravatar_id": "",
                "url": f"{api}/users/{login}",
                "html_url": f"{web}/{login}",
                "followers_url": f"{api}/users/{login}/followers",
                "following_url": f"{api}/users/{login}/following{{/other_user}}",
                "gists_url": f"{api}/users/{login}/gists{{/gist_id}}",
                "starred_url": f"{api}/users/{login}/starred{{/owner}}{{/repo}}",
                "subscriptions_url": f"{api}/users/{login}/subscriptions",
                "organizations_url": f"{api}/users/{login}/orgs",
                "repos_url": f"{api}/users/{login}/repos",
                "events_url": f"{api}/users/{login}/events{{/privacy}}",
                "received_events_url": f"{api}/users/{login}/received_events",
                "type": "User",
                "user_view_type": "public",
                "site_admin": False,
            }
            return self.users[login]

    def add_repo(self, full_name: str, *, default_branch: str = "main") -> GitHubRepo:
        owner, _, name = full_name.partition("/")
        if owner not in self.users:
            self.add_user(owner)
        bare = self.git_root / owner / f"{name}.git"
        init_bare_repo(bare, default_branch)
        with self.lock:
            repo = GitHubRepo(next(self._ids), owner, name, default_branch, bare)
            repo.collaborators[owner] = "admin"
            repo.collaborators[self.bot["login"]] = "write"
            self.repos[full_name] = repo
            return repo

    def add_collaborator(self, full_name: str, login: str, role: str) -> None:
        if login not in self.users:
            self.add_user(login)
        with self.lock:
            self.repos[full_name].collaborators[login] = role

    def add_issue(
        self,
        full_name: str,
        title: str,
        body: str | None = "",
        *,
        author: str | None = None,
        labels: list[str] | None = None,
        state: str = "open",
        locked: bool = False,
    ) -> int:
        with self.lock:
            repo = self.repos[full_name]
            number = self._take_number(repo)
            user = self._user(author)
            repo.issues[number] = self._issue_json(repo, number, title, body, user, labels or [])
            repo.issues[number].update(state=state, locked=locked)
            repo.comments[number] = []
            repo.reactions[number] = []
            return number

    def add_comment(
        self, full_name: str, number: int, body: str, *, author: str | None = None
    ) -> Json:
        with self.lock:
            repo = self.repos[full_name]
            comment = self._comment_json(repo, number, body, self._user(author))
            repo.comments[number].append(comment)
            repo.issues[number]["comments"] += 1
            return comment

    # auth and errors

    def authenticated(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() in ("token", "bearer") and hmac.compare_digest(token, self.token)

    def error_reply(self, status: int, message: Json = None) -> Reply:
        errors = message.get("_errors") if isinstance(message, dict) else None
        body: Json = {
            "message": (None if errors else message) or _MESSAGES.get(status, "Error"),
            "documentation_url": DOCS,
            "status": str(status),
        }
        if errors:
            body["errors"] = errors
        return Reply(status, body)

    def rate_limit_headers(self, retry_after: int) -> dict[str, str]:
        return {
            "retry-after": str(retry_after),
            "x-ratelimit-limit": "5000",
            "x-ratelimit-remaining": "0",
            "x-ratelimit-reset": str(int(time.time()) + retry_after),
            "x-ratelimit-resource": "core",
        }

    def repo_for_git_path(self, repo_path: str) -> Path | None:
        repo = self.repos.get(repo_path.strip("/").removesuffix(".git"))
        return None if repo is None else repo.repo

    # JSON shapes

    def _user(self, login: str | None) -> Json:
        return self.bot if login is None else self.users[login]

    def _take_number(self, repo: GitHubRepo) -> int:
        number = repo.next_number
        repo.next_number += 1
        return number

    def _repo(self, owner: str, name: str) -> GitHubRepo:
        repo = self.repos.get(f"{owner}/{name}")
        if repo is None:
            raise HttpError(404)
        return repo

    def _issue(self, repo: GitHubRepo, number: str) -> Json:
        issue = repo.issues.get(int(number))
        if issue is None:
            raise HttpError(404)
        return issue

    def _repo_json(self, repo: GitHubRepo) -> Json:
        api = f"{self.api_url}/repos/{repo.full_name}"
        urls = {
            f"{name}_url": f"{api}/{name}{suffix}"
            for name, suffix in [
                ("archive", "/{archive_format}{/ref}"),
                ("assignees", "{/user}"),
                ("blobs", "/git/blobs{/sha}"),
                ("branches", "{/branch}"),
                ("collaborators", "{/collaborator}"),
                ("comments", "{/number}"),
                ("commits", "{/sha}"),
                ("compare", "/compare/{base}...{head}"),
                ("contents", "/{+path}"),
                ("contributors", ""),
                ("deployments", ""),
                ("downloads", ""),
                ("events", ""),
                ("forks", ""),
                ("hooks", ""),
                ("issue_comment", "/issues/comments{/number}"),
                ("issue_events", "/issues/events{/number}"),
                ("issues", "{/number}"),
                ("keys", "{/key_id}"),
                ("labels", "{/name}"),
                ("languages", ""),
                ("merges", ""),
                ("milestones", "{/number}"),
                ("notifications", "{?since,all,participating}"),
                ("pulls", "{/number}"),
                ("releases", "{/id}"),
                ("stargazers", ""),
                ("statuses", "/{sha}"),
                ("subscribers", ""),
                ("subscription", ""),
                ("tags", ""),
                ("teams", ""),
                ("trees", "/git/trees{/sha}"),
            ]
        }
        urls |= {
            "git_commits_url": f"{api}/git/commits{{/sha}}",
            "git_refs_url": f"{api}/git/refs{{/sha}}",
            "git_tags_url": f"{api}/git/tags{{/sha}}",
        }
        open_issues = sum(1 for i in repo.issues.values() if i["state"] == "open")
        return urls | {
            "id": repo.id,
            "node_id": f"R_kgDO{repo.id}",
            "name": repo.name,
            "full_name": repo.full_name,
            "owner": self.users[repo.owner],
            "private": repo.private,
            "html_url": f"{self.url}/{repo.full_name}",
            "description": None,
            "fork": False,
            "url": api,
            "git_url": f"git://127.0.0.1/{repo.full_name}.git",
            "ssh_url": f"git@127.0.0.1:{repo.full_name}.git",
            "clone_url": f"{self.url}/{repo.full_name}.git",
            "svn_url": f"{self.url}/{repo.full_name}",
            "mirror_url": None,
            "homepage": None,
            "language": None,
            "forks_count": 0,
            "forks": 0,
            "stargazers_count": 0,
            "watchers_count": 0,
            "watchers": 0,
            "subscribers_count": 1,
            "network_count": 0,
            "size": 0,
            "default_branch": repo.default_branch,
            "open_issues_count": open_issues,
            "open_issues": open_issues,
            "is_template": False,
            "topics": [],
            "has_issues": True,
            "has_projects": True,
            "has_wiki": False,
            "has_pages": False,
            "has_downloads": True,
            "has_discussions": False,
            "archived": False,
            "disabled": False,
            "visibility": "private" if repo.private else "public",
            "pushed_at": _now(),
            "created_at": _now(),
            "updated_at": _now(),
            "license": None,
            "allow_forking": True,
            "web_commit_signoff_required": False,
        }

    def _issue_json(
        self,
        repo: GitHubRepo,
        number: int,
        title: str,
        body: str | None,
        user: Json,
        labels: list[str],
    ) -> Json:
        api = f"{self.api_url}/repos/{repo.full_name}"
        return {
            "id": next(self._ids),
            "node_id": f"I_kwDO{number}",
            "url": f"{api}/issues/{number}",
            "repository_url": api,
            "labels_url": f"{api}/issues/{number}/labels{{/name}}",
            "comments_url": f"{api}/issues/{number}/comments",
            "events_url": f"{api}/issues/{number}/events",
            "html_url": f"{self.url}/{repo.full_name}/issues/{number}",
            "number": number,
            "state": "open",
            "state_reason": None,
            "title": title,
            "body": body,
            "user": user,
            "labels": [self._label_json(repo, name) for name in labels],
            "assignee": None,
            "assignees": [],
            "milestone": None,
            "locked": False,
            "active_lock_reason": None,
            "comments": 0,
            "closed_at": None,
            "created_at": _now(),
            "updated_at": _now(),
            "closed_by": None,
            "author_association": "OWNER" if user["login"] == repo.owner else "CONTRIBUTOR",
        }

    def _label_json(self, repo: GitHubRepo, name: str) -> Json:
        return {
            "id": next(self._ids),
            "node_id": f"LA_kwDO{name}",
            "url": f"{self.api_url}/repos/{repo.full_name}/labels/{name}",
            "name": name,
            "description": None,
            "color": "ededed",
            "default": False,
        }

    def _comment_json(self, repo: GitHubRepo, number: int, body: str, user: Json) -> Json:
        comment_id = next(self._ids)
        api = f"{self.api_url}/repos/{repo.full_name}"
        return {
            "id": comment_id,
            "node_id": f"IC_kwDO{comment_id}",
            "url": f"{api}/issues/comments/{comment_id}",
            "html_url": f"{self.url}/{repo.full_name}/issues/{number}#issuecomment-{comment_id}",
            "body": body,
            "user": user,
            "created_at": _now(),
            "updated_at": _now(),
            "issue_url": f"{api}/issues/{number}",
            "author_association": "CONTRIBUTOR",
        }

    def _pull_json(self, repo: GitHubRepo, number: int, body: Json) -> Json:
        api = f"{self.api_url}/repos/{repo.full_name}"
        html = f"{self.url}/{repo.full_name}/pull/{number}"
        return {
            "url": f"{api}/pulls/{number}",
            "id": next(self._ids),
            "node_id": f"PR_kwDO{number}",
            "html_url": html,
            "diff_url": f"{html}.diff",
            "patch_url": f"{html}.patch",
            "issue_url": f"{api}/issues/{number}",
            "commits_url": f"{api}/pulls/{number}/commits",
            "review_comments_url": f"{api}/pulls/{number}/comments",
            "review_comment_url": f"{api}/pulls/comments{{/number}}",
            "comments_url": f"{api}/issues/{number}/comments",
            "statuses_url": f"{api}/statuses/{branch_sha(repo.repo, body['head'])}",
            "number": number,
            "state": "open",
            "locked": False,
            "title": body["title"],
            "user": self.bot,
            "body": body.get("body"),
            "labels": [],
            "milestone": None,
            "active_lock_reason": None,
            "created_at": _now(),
            "updated_at": _now(),
            "closed_at": None,
            "merged_at": None,
            "merge_commit_sha": None,
            "assignee": None,
            "assignees": [],
            "requested_reviewers": [],
            "requested_teams": [],
            "head": self._ref_json(repo, str(body["head"])),
            "base": self._ref_json(repo, str(body["base"])),
            "_links": {
                "self": {"href": f"{api}/pulls/{number}"},
                "html": {"href": html},
                "issue": {"href": f"{api}/issues/{number}"},
                "comments": {"href": f"{api}/issues/{number}/comments"},
                "review_comments": {"href": f"{api}/pulls/{number}/comments"},
                "review_comment": {"href": f"{api}/pulls/comments{{/number}}"},
                "commits": {"href": f"{api}/pulls/{number}/commits"},
                "statuses": {"href": f"{api}/statuses/{branch_sha(repo.repo, body['head'])}"},
            },
            "author_association": "CONTRIBUTOR",
            "auto_merge": None,
            "draft": bool(body.get("draft", False)),
            "merged": False,
            "mergeable": None,
            "rebaseable": None,
            "mergeable_state": "draft" if body.get("draft") else "unknown",
            "merged_by": None,
            "comments": 0,
            "review_comments": 0,
            "maintainer_can_modify": False,
            "commits": 1,
            "additions": 0,
            "deletions": 0,
            "changed_files": 0,
        }

    def _ref_json(self, repo: GitHubRepo, branch: str) -> Json:
        return {
            "label": f"{repo.owner}:{branch}",
            "ref": branch,
            "sha": branch_sha(repo.repo, branch),
            "user": self.users[repo.owner],
            "repo": self._repo_json(repo),
        }

    # routes

    def _page(self, request: Request, items: list[Json]) -> Reply:
        page, headers = paginate(items, request, self.url, default_per_page=30)
        return Reply(200, page, headers)

    def _get_repo(self, request: Request, owner: str, name: str) -> Reply:
        return Reply(200, self._repo_json(self._repo(owner, name)))

    def _get_issue(self, request: Request, owner: str, name: str, number: str) -> Reply:
        return Reply(200, self._issue(self._repo(owner, name), number))

    def _list_comments(self, request: Request, owner: str, name: str, number: str) -> Reply:
        repo = self._repo(owner, name)
        self._issue(repo, number)
        return self._page(request, repo.comments[int(number)])

    def _create_comment(self, request: Request, owner: str, name: str, number: str) -> Reply:
        repo = self._repo(owner, name)
        issue = self._issue(repo, number)
        body = request.json().get("body")
        if not isinstance(body, str) or not body:
            raise HttpError(422)
        bot_permission = _PERMISSIONS.get(repo.collaborators.get(self.bot["login"], ""))
        if issue["locked"] and bot_permission not in ("admin", "write"):
            raise HttpError(403, "Unable to create comment because issue is locked.")
        comment = self._comment_json(repo, int(number), body, self.bot)
        repo.comments[int(number)].append(comment)
        issue["comments"] += 1
        return Reply(201, comment)

    def _create_reaction(self, request: Request, owner: str, name: str, number: str) -> Reply:
        repo = self._repo(owner, name)
        self._issue(repo, number)
        content = request.json().get("content")
        if content not in _REACTIONS:
            raise HttpError(422)
        for reaction in repo.reactions[int(number)]:
            if reaction["content"] == content and reaction["user"]["id"] == self.bot["id"]:
                return Reply(200, reaction)
        reaction_id = next(self._ids)
        reaction = {
            "id": reaction_id,
            "node_id": f"REA_lADO{reaction_id}",
            "user": self.bot,
            "content": content,
            "created_at": _now(),
        }
        repo.reactions[int(number)].append(reaction)
        return Reply(201, reaction)

    def _get_permission(self, request: Request, owner: str, name: str, login: str) -> Reply:
        repo = self._repo(owner, name)
        user = self.users.get(login)
        if user is None:
            raise HttpError(404)
        role = repo.collaborators.get(login)
        permission = _PERMISSIONS.get(role or "", "none")
        collaborator = user | {
            "permissions": {
                "admin": permission == "admin",
                "maintain": role in ("admin", "maintain"),
                "push": permission in ("admin", "write"),
                "triage": permission != "none",
                "pull": permission != "none",
            },
            "role_name": role or "none",
        }
        body = {"permission": permission, "role_name": role or "none", "user": collaborator}
        return Reply(200, body)

    def _list_pulls(self, request: Request, owner: str, name: str) -> Reply:
        repo = self._repo(owner, name)
        q = request.query
        state = q.get("state", "open")
        pulls = [
            pull
            for pull in sorted(repo.pulls.values(), key=lambda p: -p["number"])
            if state in ("all", pull["state"])
            and q.get("head", pull["head"]["label"]) == pull["head"]["label"]
            and q.get("base", pull["base"]["ref"]) == pull["base"]["ref"]
        ]
        return self._page(request, pulls)

    def _create_pull(self, request: Request, owner: str, name: str) -> Reply:
        repo = self._repo(owner, name)
        body = request.json()
        head, base = str(body.get("head", "")).rpartition(":")[2], str(body.get("base", ""))
        body["head"] = head
        self._validate_pull(repo, head, base, body)
        number = self._take_number(repo)
        repo.pulls[number] = self._pull_json(repo, number, body)
        return Reply(201, repo.pulls[number])

    def _validate_pull(self, repo: GitHubRepo, head: str, base: str, body: Json) -> None:
        if not body.get("title"):
            raise HttpError(422, 'Invalid request.\n\n"title" wasn\'t supplied.')
        for field_name, branch in (("head", head), ("base", base)):
            if not branch_exists(repo.repo, branch):
                raise self._validation(field_name, "invalid", None)
        for pull in repo.pulls.values():
            if pull["head"]["ref"] == head and pull["state"] == "open":
                message = f"A pull request already exists for {repo.owner}:{head}."
                raise self._validation(None, "custom", message)

    def _validation(self, field_name: str | None, code: str, message: str | None) -> HttpError:
        error: Json = {"resource": "PullRequest", "code": code}
        if field_name is not None:
            error["field"] = field_name
        if message is not None:
            error["message"] = message
        return HttpError(422, {"_errors": [error]})

    def _get_pull(self, request: Request, owner: str, name: str, number: str) -> Reply:
        pull = self._repo(owner, name).pulls.get(int(number))
        if pull is None:
            raise HttpError(404)
        return Reply(200, pull)

    def _update_pull(self, request: Request, owner: str, name: str, number: str) -> Reply:
        pull = self._repo(owner, name).pulls.get(int(number))
        if pull is None:
            raise HttpError(404)
        body = request.json()
        for key in ("title", "body", "state"):
            if key in body:
                pull[key] = body[key]
        pull["updated_at"] = _now()
        return Reply(200, pull)
