"""What the client's own modules (arrays, functions, programs, the command stream, and the IFRT
proxy's sessions) use of a Client: this interface, and no private member.

A user program needs none of it; it is public so that the parts of the client talk through a
named, small surface rather than each other's internals."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent import futures
from typing import TYPE_CHECKING, Protocol

from jax.sharding import PartitionSpec

from proto import pathways_pb2_grpc as pb_grpc
from proto.config import ClientConfig

if TYPE_CHECKING:
    import jax

    from runtime.client.array import RemoteArray
    from runtime.client.client import VirtualSlice
    from runtime.client.program import Trace
    from runtime.client.stream import CommandStream


class ClientCore(Protocol):
    """The members of a Client its own modules use (besides its user API: put, transfer...)."""

    address: str  # the controller's
    session_id: int
    timeout_s: float
    #: The client's settings, whole (proto.config).
    config: ClientConfig
    #: The session's commands on their way to the controller, batched (runtime.client.stream).
    commands: CommandStream
    #: The controller's stub, on the session's channel (token and session key on every call).
    controller_stub: pb_grpc.ControllerStub
    #: Threads for puts and fetches (one read or write of a host each).
    transfer_pool: futures.ThreadPoolExecutor

    def call(self, method: str, request, timeout: float | None = None):
        """A controller RPC; failures come back as runtime exceptions (proto.errors)."""

    def worker_stub(self, address: str) -> pb_grpc.WorkerStub:
        """The stub of a host, on a channel carrying the session's credentials."""

    def new_handle(self, shape, dtype, spec: PartitionSpec, vslice: VirtualSlice, *,
                   weak_type: bool = False) -> RemoteArray:
        """A handle for an array about to be created (a placeholder while tracing a program)."""

    def current_trace(self) -> Trace | None:
        """The program being traced on this thread, if any."""

    def tracing(self, trace: Trace) -> contextlib.AbstractContextManager[None]:
        """Traces calls into `trace` instead of running them, for the `with` block."""

    def put_flat(self, leaves: Sequence, specs: Sequence[PartitionSpec], vslice: VirtualSlice,
                 avals: Sequence[jax.ShapeDtypeStruct]) -> list[RemoteArray]:
        """Puts host values as arrays on a slice."""
