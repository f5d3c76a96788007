"""Clients of the runner protocol: ``RunnerClient`` over a gRPC or in-process transport."""

from forgehand.runner.client.client import RetryPolicy, RunnerClient, new_run_id
from forgehand.runner.client.connectors import (
    Connector,
    ExecConnector,
    TlsConnector,
    UnixConnector,
)
from forgehand.runner.client.grpc_transport import GrpcTransport
from forgehand.runner.client.local import LocalTransport

__all__ = [
    "Connector",
    "ExecConnector",
    "GrpcTransport",
    "LocalTransport",
    "RetryPolicy",
    "RunnerClient",
    "TlsConnector",
    "UnixConnector",
    "new_run_id",
]
