"""A fake GitLab (REST API v4) for the endpoints the GitLab adapter uses.

Shapes follow docs.gitlab.com/api (issues, notes, award_emoji, users, members,
merge_requests, projects). Auth: `PRIVATE-TOKEN` or `Authorization: Bearer`. Errors:
`{"message": "404 Project Not Found"}` and friends; 429 is plain text with
`Retry-After` and `RateLimit-*` headers like GitLab's rack-attack throttle.
Git: `http://HOST/GROUP/PROJECT.git` through `git http-backend`, any username,
the token as password.
"""

from __future__ import annotations

import hmac
import itertools
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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

_REASONS = {
    400: "400 Bad request",
    401: "401 Unauthorized",
    403: "403 Forbidden",
    404: "404 Not found",
    405: "405 Method Not Allowed",
    409: "409 Conflict",
    422: "422 Unprocessable Entity",
    500: "500 Internal Server Error",
    502: "502 Bad Gateway",
    503: "503 Service Unavailable",
}
_DRAFT = re.compile(r"^\s*(\[draft\]|\(draft\)|draft:)", re.IGNORECASE)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class GitLabProject:
    id: int
    path: str
    default_branch: str
    repo: Path
    members: dict[int, int] = field(default_factory=dict)
    issues: dict[int, Json] = field(default_factory=dict)
    notes: dict[int, list[Json]] = field(default_factory=dict)
    awards: dict[int, list[Json]] = field(default_factory=dict)
    merge_requests: dict[int, Json] = field(default_factory=dict)


class FakeGitLab(FakeForgeServer):
    """In-memory GitLab; seed it with `add_user`, `add_project`, `add_issue`, `add_note`."""

    api_prefix = "/api/v4"

    def __init__(self, git_root: Path, token: str, *, bot_username: str = "forgehand-bot") -> None:
        super().__init__(git_root, token)
        self._ids = itertools.count(1)
        self.users: dict[int, Json] = {}
        self.projects: dict[str, GitLabProject] = {}
        self.bot = self.add_user(bot_username, name="forgehand bot")
        self._register_routes()

    def _register_routes(self) -> None:
        p = r"/projects/([^/]+)"
        self.route("GET", p, self._get_project)
        self.route("GET", p + r"/issues/(\d+)", self._get_issue)
        self.route("GET", p + r"/issues/(\d+)/notes", self._list_notes)
        self.route("POST", p + r"/issues/(\d+)/notes", self._create_note)
        self.route("GET", p + r"/issues/(\d+)/award_emoji", self._list_awards)
        self.route("POST", p + r"/issues/(\d+)/award_emoji", self._create_award)
        self.route("GET", r"/users", self._list_users)
        self.route("GET", p + r"/members/all/(\d+)", self._get_member)
        self.route("GET", p + r"/merge_requests", self._list_mrs)
        self.route("POST", p + r"/merge_requests", self._create_mr)
        self.route("GET", p + r"/merge_requests/(\d+)", self._get_mr)
        self.route("PUT", p + r"/merge_requests/(\d+)", self._update_mr)

    # seeding

    def add_user(self, username: str, *, name: str | None = None) -> Json:
        with self.lock:
            user_id = next(self._ids)
            user = {
                "id": user_id,
                "username": username,
                "name": name or username,
                "state": "active",
                "locked": False,
                "avatar_url": f"{self.url}/uploads/-/system/user/avatar/{user_id}/avatar.png",
                "web_url": f"{self.url}/{username}",
            }
            self.users[user_id] = user
            return user

    def add_project(self, path: str, *, default_branch: str = "main") -> GitLabProject:
        repo = self.git_root / f"{path}.git"
        init_bare_repo(repo, default_branch)
        with self.lock:
            project = GitLabProject(next(self._ids), path, default_branch, repo)
            project.members[self.bot["id"]] = 30
            self.projects[path] = project
            return project

    def add_member(self, path: str, username: str, access_level: int) -> None:
        with self.lock:
            self.projects[path].members[self._user_named(username)["id"]] = access_level

    def add_issue(
        self,
        path: str,
        title: str,
        description: str = "",
        *,
        author: str | None = None,
        labels: list[str] | None = None,
        state: str = "opened",
        discussion_locked: bool | None = None,
    ) -> int:
        with self.lock:
            project = self.projects[path]
            iid = len(project.issues) + 1
            project.issues[iid] = self._issue_json(
                project, iid, title, description, author, labels or [], state, discussion_locked
            )
            project.notes[iid] = []
            project.awards[iid] = []
            return iid

    def add_note(
        self, path: str, iid: int, body: str, *, author: str | None = None, system: bool = False
    ) -> Json:
        with self.lock:
            project = self.projects[path]
            note = self._note_json(project, iid, body, self._author(author), system)
            project.notes[iid].append(note)
            return note

    # auth and errors

    def authenticated(self, request: Request) -> bool:
        token = request.headers.get("private-token") or ""
        bearer = request.headers.get("authorization", "")
        if bearer.startswith("Bearer "):
            token = bearer.removeprefix("Bearer ")
        return hmac.compare_digest(token, self.token)

    def error_reply(self, status: int, message: Json = None) -> Reply:
        if status == 429:
            return Reply(429, raw=b"Retry later\n", headers={"Content-Type": "text/plain"})
        return Reply(status, {"message": message or _REASONS.get(status, f"{status} Error")})

    def rate_limit_headers(self, retry_after: int) -> dict[str, str]:
        reset = int(time.time()) + retry_after
        return {
            "Retry-After": str(retry_after),
            "RateLimit-Name": "throttle_authenticated_api",
            "RateLimit-Limit": "60",
            "RateLimit-Observed": "61",
            "RateLimit-Remaining": "0",
            "RateLimit-Reset": str(reset),
            "RateLimit-ResetTime": datetime.fromtimestamp(reset, UTC).strftime(
                "%a, %d %b %Y %H:%M:%S GMT"
            ),
        }

    def repo_for_git_path(self, repo_path: str) -> Path | None:
        project = self.projects.get(repo_path.strip("/").removesuffix(".git"))
        return None if project is None else project.repo

    # JSON shapes

    def _user_named(self, username: str) -> Json:
        for user in self.users.values():
            if user["username"] == username:
                return user
        raise KeyError(username)

    def _author(self, username: str | None) -> Json:
        return self.bot if username is None else self._user_named(username)

    def _project(self, ident: str) -> GitLabProject:
        for project in self.projects.values():
            if ident in (project.path, str(project.id)):
                return project
        raise HttpError(404, "404 Project Not Found")

    def _issue(self, project: GitLabProject, iid: str) -> Json:
        issue = project.issues.get(int(iid))
        if issue is None:
            raise HttpError(404, "404 Issue Not Found")
        return issue

    def _project_json(self, project: GitLabProject) -> Json:
        namespace, _, name = project.path.rpartition("/")
        return {
            "id": project.id,
            "description": None,
            "name": name,
            "name_with_namespace": project.path.replace("/", " / "),
            "path": name,
            "path_with_namespace": project.path,
            "created_at": _now(),
            "default_branch": project.default_branch,
            "tag_list": [],
            "topics": [],
            "ssh_url_to_repo": f"git@127.0.0.1:{project.path}.git",
            "http_url_to_repo": f"{self.url}/{project.path}.git",
            "web_url": f"{self.url}/{project.path}",
            "readme_url": None,
            "forks_count": 0,
            "avatar_url": None,
            "star_count": 0,
            "last_activity_at": _now(),
            "namespace": {
                "id": 1,
                "name": namespace.rpartition("/")[2],
                "path": namespace.rpartition("/")[2],
                "kind": "group",
                "full_path": namespace,
                "parent_id": None,
                "avatar_url": None,
                "web_url": f"{self.url}/groups/{namespace}",
            },
            "visibility": "private",
            "archived": False,
            "issues_enabled": True,
            "merge_requests_enabled": True,
            "open_issues_count": sum(1 for i in project.issues.values() if i["state"] == "opened"),
        }

    def _issue_json(
        self,
        project: GitLabProject,
        iid: int,
        title: str,
        description: str,
        author: str | None,
        labels: list[str],
        state: str,
        discussion_locked: bool | None,
    ) -> Json:
        web_url = f"{self.url}/{project.path}/-/issues/{iid}"
        return {
            "id": next(self._ids),
            "iid": iid,
            "project_id": project.id,
            "title": title,
            "description": description,
            "state": state,
            "created_at": _now(),
            "updated_at": _now(),
            "closed_at": None,
            "closed_by": None,
            "labels": labels,
            "milestone": None,
            "assignees": [],
            "assignee": None,
            "author": self._author(author),
            "type": "ISSUE",
            "user_notes_count": 0,
            "merge_requests_count": 0,
            "upvotes": 0,
            "downvotes": 0,
            "due_date": None,
            "confidential": False,
            "discussion_locked": discussion_locked,
            "issue_type": "issue",
            "web_url": web_url,
            "time_stats": {"time_estimate": 0, "total_time_spent": 0},
            "task_completion_status": {"count": 0, "completed_count": 0},
            "references": {
                "short": f"#{iid}",
                "relative": f"#{iid}",
                "full": f"{project.path}#{iid}",
            },
            "severity": "UNKNOWN",
            "moved_to_id": None,
            "_links": {
                "self": f"{self.url}/api/v4/projects/{project.id}/issues/{iid}",
                "notes": f"{self.url}/api/v4/projects/{project.id}/issues/{iid}/notes",
                "award_emoji": f"{self.url}/api/v4/projects/{project.id}/issues/{iid}/award_emoji",
                "project": f"{self.url}/api/v4/projects/{project.id}",
            },
        }

    def _note_json(
        self, project: GitLabProject, iid: int, body: str, author: Json, system: bool
    ) -> Json:
        return {
            "id": next(self._ids),
            "type": None,
            "body": body,
            "attachment": None,
            "author": author,
            "created_at": _now(),
            "updated_at": _now(),
            "system": system,
            "noteable_id": project.issues[iid]["id"],
            "noteable_type": "Issue",
            "project_id": project.id,
            "resolvable": False,
            "confidential": False,
            "internal": False,
            "imported": False,
            "imported_from": "none",
            "noteable_iid": iid,
        }

    def _mr_json(self, project: GitLabProject, iid: int, body: dict[str, Any]) -> Json:
        title = str(body["title"])
        draft = _DRAFT.match(title) is not None
        return {
            "id": next(self._ids),
            "iid": iid,
            "project_id": project.id,
            "title": title,
            "description": body.get("description") or "",
            "state": "opened",
            "created_at": _now(),
            "updated_at": _now(),
            "merged_by": None,
            "merge_user": None,
            "merged_at": None,
            "closed_by": None,
            "closed_at": None,
            "target_branch": body["target_branch"],
            "source_branch": body["source_branch"],
            "user_notes_count": 0,
            "upvotes": 0,
            "downvotes": 0,
            "author": self.bot,
            "assignees": [],
            "assignee": None,
            "reviewers": [],
            "source_project_id": project.id,
            "target_project_id": project.id,
            "labels": [],
            "draft": draft,
            "work_in_progress": draft,
            "milestone": None,
            "merge_when_pipeline_succeeds": False,
            "merge_status": "checking",
            "detailed_merge_status": "draft_status" if draft else "mergeable",
            "sha": branch_sha(project.repo, str(body["source_branch"])),
            "merge_commit_sha": None,
            "squash_commit_sha": None,
            "discussion_locked": None,
            "should_remove_source_branch": None,
            "force_remove_source_branch": False,
            "reference": f"!{iid}",
            "references": {
                "short": f"!{iid}",
                "relative": f"!{iid}",
                "full": f"{project.path}!{iid}",
            },
            "web_url": f"{self.url}/{project.path}/-/merge_requests/{iid}",
            "time_stats": {"time_estimate": 0, "total_time_spent": 0},
            "squash": False,
            "squash_on_merge": False,
            "task_completion_status": {"count": 0, "completed_count": 0},
            "has_conflicts": False,
            "blocking_discussions_resolved": True,
        }

    # routes

    def _page(self, request: Request, items: list[Json]) -> Reply:
        page, headers = paginate(items, request, self.url, default_per_page=20)
        per_page = max(1, min(100, int(request.query.get("per_page") or 20)))
        current = int(request.query.get("page") or 1)
        total_pages = max(1, -(-len(items) // per_page))
        headers |= {
            "X-Page": str(current),
            "X-Per-Page": str(per_page),
            "X-Total": str(len(items)),
            "X-Total-Pages": str(total_pages),
            "X-Next-Page": str(current + 1) if current < total_pages else "",
            "X-Prev-Page": str(current - 1) if current > 1 else "",
        }
        return Reply(200, page, headers)

    def _get_project(self, request: Request, ident: str) -> Reply:
        return Reply(200, self._project_json(self._project(ident)))

    def _get_issue(self, request: Request, ident: str, iid: str) -> Reply:
        return Reply(200, self._issue(self._project(ident), iid))

    def _list_notes(self, request: Request, ident: str, iid: str) -> Reply:
        project = self._project(ident)
        self._issue(project, iid)
        notes = sorted(project.notes[int(iid)], key=lambda n: (n["created_at"], n["id"]))
        if request.query.get("sort", "desc") == "desc":
            notes.reverse()
        return self._page(request, notes)

    def _create_note(self, request: Request, ident: str, iid: str) -> Reply:
        project = self._project(ident)
        issue = self._issue(project, iid)
        body = request.json().get("body")
        if not body:
            raise HttpError(400, "400 Bad request - body is missing")
        if issue["discussion_locked"] and project.members.get(self.bot["id"], 0) < 30:
            raise HttpError(403, "403 Forbidden")
        note = self._note_json(project, int(iid), str(body), self.bot, False)
        project.notes[int(iid)].append(note)
        issue["user_notes_count"] += 1
        return Reply(201, note)

    def _list_awards(self, request: Request, ident: str, iid: str) -> Reply:
        project = self._project(ident)
        self._issue(project, iid)
        return self._page(request, project.awards[int(iid)])

    def _create_award(self, request: Request, ident: str, iid: str) -> Reply:
        project = self._project(ident)
        issue = self._issue(project, iid)
        name = str(request.json().get("name") or "")
        awards = project.awards[int(iid)]
        if any(a["name"] == name and a["user"]["id"] == self.bot["id"] for a in awards):
            raise HttpError(404, "404 Award Emoji Name has already been taken")
        award = {
            "id": next(self._ids),
            "name": name,
            "user": self.bot,
            "created_at": _now(),
            "updated_at": _now(),
            "awardable_id": issue["id"],
            "awardable_type": "Issue",
            "url": None,
        }
        awards.append(award)
        return Reply(201, award)

    def _list_users(self, request: Request) -> Reply:
        wanted = request.query.get("username")
        users = [u for u in self.users.values() if wanted is None or u["username"] == wanted]
        return self._page(request, users)

    def _get_member(self, request: Request, ident: str, user_id: str) -> Reply:
        project = self._project(ident)
        level = project.members.get(int(user_id))
        if level is None:
            raise HttpError(404, "404 Not found")
        member = {
            **self.users[int(user_id)],
            "access_level": level,
            "created_at": _now(),
            "expires_at": None,
            "membership_state": "active",
        }
        return Reply(200, member)

    def _list_mrs(self, request: Request, ident: str) -> Reply:
        project = self._project(ident)
        q = request.query
        mrs = [
            mr
            for mr in sorted(project.merge_requests.values(), key=lambda m: -m["iid"])
            if q.get("state", "all") in ("all", mr["state"])
            and q.get("source_branch", mr["source_branch"]) == mr["source_branch"]
            and q.get("target_branch", mr["target_branch"]) == mr["target_branch"]
        ]
        return self._page(request, mrs)

    def _create_mr(self, request: Request, ident: str) -> Reply:
        project = self._project(ident)
        body = request.json()
        missing = [k for k in ("source_branch", "target_branch", "title") if not body.get(k)]
        if missing:
            raise HttpError(400, f"400 Bad request - {missing[0]} is missing")
        self._validate_branches(project, str(body["source_branch"]), str(body["target_branch"]))
        iid = len(project.merge_requests) + 1
        project.merge_requests[iid] = self._mr_json(project, iid, body)
        return Reply(201, project.merge_requests[iid])

    def _validate_branches(self, project: GitLabProject, source: str, target: str) -> None:
        for mr in project.merge_requests.values():
            if mr["source_branch"] == source and mr["state"] == "opened":
                message = "Another open merge request already exists for this source branch"
                raise HttpError(409, [f"{message}: !{mr['iid']}"])
        for kind, branch in (("Source", source), ("Target", target)):
            if not branch_exists(project.repo, branch):
                raise HttpError(422, [f'{kind} branch "{branch}" does not exist'])

    def _get_mr(self, request: Request, ident: str, iid: str) -> Reply:
        mr = self._project(ident).merge_requests.get(int(iid))
        if mr is None:
            raise HttpError(404, "404 Not found")
        return Reply(200, mr)

    def _update_mr(self, request: Request, ident: str, iid: str) -> Reply:
        mr = self._project(ident).merge_requests.get(int(iid))
        if mr is None:
            raise HttpError(404, "404 Not found")
        body = request.json()
        for key in ("title", "description", "target_branch"):
            if key in body:
                mr[key] = body[key]
        mr["draft"] = mr["work_in_progress"] = _DRAFT.match(mr["title"]) is not None
        mr["updated_at"] = _now()
        return Reply(200, mr)
