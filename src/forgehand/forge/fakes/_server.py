"""The machinery both fakes share: threaded HTTP server, routing, failure injection, git."""

from __future__ import annotations

import base64
import hmac
import json
import os
import re
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, unquote, urlsplit

Json = Any
_GIT_PATH = re.compile(
    r"^(?P<repo>/.+?\.git)(?P<service>/info/refs|/git-upload-pack|/git-receive-pack)$"
)


@dataclass
class Request:
    """One API request, as the route handlers see it (header names in lower case)."""

    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> dict[str, Json]:
        if not self.body:
            return {}
        data = json.loads(self.body)
        return data if isinstance(data, dict) else {}


@dataclass
class Reply:
    status: int
    body: Json = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None


class HttpError(Exception):
    """Raised by a route handler to answer with the forge's own error body."""

    def __init__(self, status: int, message: Json = None) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


@dataclass
class Failure:
    """An injected failure: answer `status` to the next `times` matching API requests."""

    status: int
    times: int = 1
    method: str | None = None
    path_contains: str | None = None
    retry_after: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def matches(self, request: Request) -> bool:
        if self.method is not None and request.method != self.method:
            return False
        return self.path_contains is None or self.path_contains in request.path


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    status: int


Route = tuple[str, re.Pattern[str], Callable[..., Reply]]


class FakeForgeServer:
    """Base class: subclasses add routes, the auth check and the error body format."""

    api_prefix = ""

    def __init__(self, git_root: Path, token: str) -> None:
        self.git_root = git_root
        self.token = token
        self.failures: list[Failure] = []
        self.requests: list[RecordedRequest] = []
        self.lock = threading.RLock()
        self._routes: list[Route] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.fake = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    # lifecycle

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # hooks for tests

    def fail(
        self,
        status: int,
        *,
        times: int = 1,
        method: str | None = None,
        path_contains: str | None = None,
        retry_after: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Failure:
        """Answer the next `times` matching API requests with `status`."""
        failure = Failure(status, times, method, path_contains, retry_after, dict(headers or {}))
        with self.lock:
            self.failures.append(failure)
        return failure

    def api_requests(
        self, method: str | None = None, path_contains: str = ""
    ) -> list[RecordedRequest]:
        with self.lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and path_contains in r.path
            ]

    # for subclasses

    def route(self, method: str, pattern: str, handler: Callable[..., Reply]) -> None:
        self._routes.append((method, re.compile(f"^{self.api_prefix}{pattern}$"), handler))

    def authenticated(self, request: Request) -> bool:
        raise NotImplementedError

    def error_reply(self, status: int, message: Json = None) -> Reply:
        raise NotImplementedError

    def rate_limit_headers(self, retry_after: int) -> dict[str, str]:
        return {"Retry-After": str(retry_after)}

    def repo_for_git_path(self, repo_path: str) -> Path | None:
        """The bare repository served at `repo_path` (e.g. `/group/project.git`)."""
        raise NotImplementedError

    def git_credentials_ok(self, username: str, password: str) -> bool:
        return hmac.compare_digest(password, self.token)

    # dispatch

    def handle_api(self, request: Request) -> Reply:
        reply = self._dispatch(request)
        with self.lock:
            self.requests.append(
                RecordedRequest(request.method, request.path, request.query, reply.status)
            )
        return reply

    def _dispatch(self, request: Request) -> Reply:
        with self.lock:
            failure = self._take_failure(request)
            if failure is not None:
                return self._failure_reply(failure)
            if not self.authenticated(request):
                return self.error_reply(401)
            return self._route(request)

    def _take_failure(self, request: Request) -> Failure | None:
        for failure in self.failures:
            if failure.times > 0 and failure.matches(request):
                failure.times -= 1
                return failure
        return None

    def _failure_reply(self, failure: Failure) -> Reply:
        reply = self.error_reply(failure.status)
        if failure.retry_after is not None:
            reply.headers.update(self.rate_limit_headers(failure.retry_after))
        reply.headers.update(failure.headers)
        return reply

    def _route(self, request: Request) -> Reply:
        allowed = False
        for method, pattern, handler in self._routes:
            match = pattern.match(request.path)
            if match is None:
                continue
            allowed = True
            if method == request.method:
                try:
                    return handler(request, *(unquote(g) for g in match.groups()))
                except HttpError as exc:
                    return self.error_reply(exc.status, exc.message)
        return self.error_reply(405 if allowed else 404)

    # git smart HTTP through git http-backend (CGI)

    def handle_git(self, handler: _Handler, repo_path: str, body: bytes) -> None:
        repo = self.repo_for_git_path(unquote(repo_path))
        if repo is None:
            handler.send_plain(404, b"Repository not found\n")
            return
        user = _basic_user(handler.headers.get("Authorization", ""), self.git_credentials_ok)
        if user is None:
            handler.send_plain(
                401,
                b"HTTP Basic: Access denied\n",
                {"WWW-Authenticate": 'Basic realm="fake forge"'},
            )
            return
        status, headers, payload = _run_http_backend(handler, repo, repo_path, user, body)
        handler.send_bytes(status, payload, headers)


def _basic_user(header: str, check: Callable[[str, str], bool]) -> str | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        username, _, password = base64.b64decode(encoded).decode().partition(":")
    except ValueError:
        return None
    return username if username and check(username, password) else None


def _run_http_backend(
    handler: _Handler, repo: Path, repo_path: str, user: str, body: bytes
) -> tuple[int, dict[str, str], bytes]:
    split = urlsplit(handler.path)
    service_path = split.path[len(repo_path) :]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GIT_PROJECT_ROOT": str(repo.parent),
        "GIT_HTTP_EXPORT_ALL": "1",
        "PATH_INFO": f"/{repo.name}{service_path}",
        "QUERY_STRING": split.query,
        "REQUEST_METHOD": handler.command,
        "CONTENT_TYPE": handler.headers.get("Content-Type", ""),
        "CONTENT_LENGTH": str(len(body)),
        "REMOTE_USER": user,
        "REMOTE_ADDR": "127.0.0.1",
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(repo.parent),
    }
    for name in ("Content-Encoding", "Git-Protocol"):
        if value := handler.headers.get(name):
            env["HTTP_" + name.upper().replace("-", "_")] = value
    result = subprocess.run(
        ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
    )
    return _parse_cgi(result.stdout)


def _parse_cgi(output: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, payload = output.partition(b"\r\n\r\n")
    if not _:
        head, _, payload = output.partition(b"\n\n")
    status, headers = 200, {}
    for line in head.decode("latin-1").splitlines():
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = int(value.strip().split()[0])
        elif name:
            headers[name.strip()] = value.strip()
    return status, headers, payload


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-forge"

    @property
    def fake(self) -> FakeForgeServer:
        fake: FakeForgeServer = self.server.fake  # type: ignore[attr-defined]
        return fake

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        body = self._read_body()
        split = urlsplit(self.path)
        git = _GIT_PATH.match(split.path)
        if git is not None:
            self.fake.handle_git(self, git.group("repo"), body)
            return
        request = Request(
            method=self.command,
            path=split.path,
            query=dict(parse_qsl(split.query, keep_blank_values=True)),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        self._send_reply(self.fake.handle_api(request))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                self.rfile.readline()
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _send_reply(self, reply: Reply) -> None:
        headers = dict(reply.headers)
        if reply.raw is not None:
            payload = reply.raw
            headers.setdefault("Content-Type", "text/plain")
        else:
            payload = b"" if reply.status == 204 else json.dumps(reply.body).encode()
            headers.setdefault("Content-Type", "application/json")
        self.send_bytes(reply.status, payload, headers)

    def send_plain(
        self, status: int, payload: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_bytes(status, payload, {"Content-Type": "text/plain", **(headers or {})})

    def send_bytes(self, status: int, payload: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def paginate(
    items: list[Json], request: Request, base_url: str, *, default_per_page: int
) -> tuple[list[Json], dict[str, str]]:
    """One page of `items` and the Link header pointing at its neighbours."""
    per_page = max(1, min(100, int(request.query.get("per_page") or default_per_page)))
    page = max(1, int(request.query.get("page") or 1))
    pages = max(1, -(-len(items) // per_page))
    links = {"first": 1, "last": pages}
    if page < pages:
        links["next"] = page + 1
    if page > 1:
        links["prev"] = page - 1
    link = ", ".join(
        f'<{_page_url(base_url, request, n, per_page)}>; rel="{rel}"' for rel, n in links.items()
    )
    return items[(page - 1) * per_page : page * per_page], {"Link": link}


def _page_url(base_url: str, request: Request, page: int, per_page: int) -> str:
    query = {**request.query, "page": str(page), "per_page": str(per_page)}
    encoded = "&".join(f"{k}={v}" for k, v in query.items())
    return f"{base_url}{request.path}?{encoded}"


def init_bare_repo(path: Path, default_branch: str) -> None:
    """Create a bare repository that accepts pushes over HTTP."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["git", "init", "--quiet", "--bare", f"--initial-branch={default_branch}", str(path)],
        check=True,
    )
    subprocess.run(
        ["git", "--git-dir", str(path), "config", "http.receivepack", "true"], check=True
    )


def branch_exists(repo: Path, branch: str) -> bool:
    result = subprocess.run(
        ["git", "--git-dir", str(repo), "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def branch_sha(repo: Path, branch: str) -> str:
    result = subprocess.run(
        ["git", "--git-dir", str(repo), "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"],
        capture_output=True,
        check=False,
        text=True,
    )
    return result.stdout.strip() or "0" * 40
