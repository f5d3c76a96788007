"""The runner's errors. Each maps to one gRPC status code; the message says what to do.

    RunnerError
    ├── InvalidArgument      INVALID_ARGUMENT     malformed or oversized request
    ├── NotFound             NOT_FOUND            unknown run, missing file
    ├── AlreadyExists        ALREADY_EXISTS       run id reused with a different request
    ├── ResourceExhausted    RESOURCE_EXHAUSTED   too many runs, journal space used up
    ├── PermissionDenied     PERMISSION_DENIED    path outside the runner's roots
    ├── FailedPrecondition   FAILED_PRECONDITION  e.g. stdin to a run started without it
    ├── Unauthenticated      UNAUTHENTICATED      missing or wrong bearer token
    ├── Unavailable          UNAVAILABLE          the runner cannot be reached
    ├── DeadlineExceeded     DEADLINE_EXCEEDED    an RPC took longer than its deadline
    └── Internal             INTERNAL             a bug; details stay in the runner's log

The same classes are raised by the client, so callers handle one tree whichever side failed.
"""

from __future__ import annotations

import grpc


class RunnerError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidArgument(RunnerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RunnerError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RunnerError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(RunnerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(RunnerError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(RunnerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(RunnerError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(RunnerError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RunnerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(RunnerError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[RunnerError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        ResourceExhausted,
        PermissionDenied,
        FailedPrecondition,
        Unauthenticated,
        Unavailable,
        DeadlineExceeded,
        Internal,
    )
}


def from_status(code: grpc.StatusCode, message: str) -> RunnerError:
    """The error class for a gRPC status received by a client."""
    return _BY_CODE.get(code, RunnerError)(message or code.name)
