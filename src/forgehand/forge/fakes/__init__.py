"""Faithful local fakes of the GitLab and GitHub REST APIs, with a real git server.

Each fake is a stdlib HTTP server on 127.0.0.1, port 0, in a background thread. It keeps
its state in memory, checks the token like the real service, answers in the real JSON
shapes and serves each project's bare repository through `git http-backend`, so a real
`git push` with the forge's credentials works against it. `fail(...)` injects failures.
"""

from forgehand.forge.fakes._server import Failure, RecordedRequest
from forgehand.forge.fakes.github_server import FakeGitHub
from forgehand.forge.fakes.gitlab_server import FakeGitLab

__all__ = ["Failure", "FakeGitHub", "FakeGitLab", "RecordedRequest"]
