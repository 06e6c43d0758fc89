"""Several gRPC servers of one process, stopped as one.

A host serves client traffic on one server and its cluster's control traffic (the controller's
dispatch, progress stream and heartbeat) on another, each with threads of its own
(runtime.worker.worker): a flood on the first cannot make the second late. Whoever stops the host
stops both, through one `ServerGroup`, which looks like a single server to its callers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc


class _AllStopped:
    """Set once every server of a group has stopped (what `grpc.Server.stop` returns, for all)."""

    def __init__(self, events: Sequence) -> None:
        self._events = list(events)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self._events:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not event.wait(left):
                return False
        return True

    def is_set(self) -> bool:
        return all(event.is_set() for event in self._events)


class ServerGroup:
    """Servers that start and stop together; `stop` and `wait_for_termination` act on all."""

    def __init__(self, servers: Sequence[grpc.Server]) -> None:
        self.servers = list(servers)

    def stop(self, grace: float | None) -> _AllStopped:
        """Stops every server (see grpc.Server.stop); the result's wait() covers them all."""
        return _AllStopped([server.stop(grace) for server in self.servers])

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return _AllStopped([_Terminated(s) for s in self.servers]).wait(timeout)


class _Terminated:
    def __init__(self, server: grpc.Server) -> None:
        self._server = server

    def wait(self, timeout: float | None) -> bool:
        return not self._server.wait_for_termination(timeout)
