"""Errors raised by the sandbox layer.

Every message names the cause and what to do next.

    SandboxError
    ├── BackendUnavailable      a tool or kernel feature the backend needs is missing
    ├── IsolationUnavailable    the backend cannot give the isolation level asked for
    ├── SeccompError            no seccomp filter for this architecture
    ├── CgroupError             a limits group could not be created, changed or removed
    ├── SandboxStateError       an operation does not fit the sandbox's lifecycle state
    └── SandboxLaunchError      the sandbox could not be set up or started

Invalid specs are reported by pydantic's ``ValidationError`` (see ``spec.py``), whose
message names the offending field.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base class of every error the sandbox layer raises."""


class BackendUnavailable(SandboxError):
    """A tool or kernel feature the backend needs is missing on this machine."""


class IsolationUnavailable(SandboxError):
    """The backend cannot provide the isolation level the spec requires."""


class SeccompError(SandboxError):
    """No seccomp filter can be built for the requested architecture."""


class CgroupError(SandboxError):
    """A cgroup could not be created, configured, joined or removed."""


class SandboxStateError(SandboxError):
    """The sandbox is in a state where the requested operation is not allowed."""


class SandboxLaunchError(SandboxError):
    """The sandbox could not be set up or its command could not be started."""
