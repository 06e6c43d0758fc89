"""A Pathways-style single-controller dataflow runtime for JAX.

Typical use::

    import runtime as pw
    with pw.LocalCluster(islands=2, devices_per_island=4) as cluster:
        client = cluster.client()
        s = client.slice((2, 2), ("data", "model"), island=0)
        x = client.put(np.ones((8, 8), np.float32), s, P("data", "model"))
        f = client.jit(lambda a: a @ a.T, s, out_specs=P("data"))
        y = f(x)              # returns before the computation runs
        print(y.fetch())

This package exports the user API only: the client and what it returns, the clusters that start
one, the errors, and the training metrics a user's loop records. The servers (Controller, Worker
and their gRPC servers) are behind `runtime.server`. Each subpackage is the code of one process:
runtime.client (the user's process), runtime.controller, runtime.worker, runtime.cluster (the
launchers) and runtime.cli (`pathways`); proto/ is the floor they all share (docs/architecture.md).
"""

import os

# gRPC's core logs INFO lines (fork handlers, GOAWAY) to stderr unless told otherwise.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from proto.errors import (ArrayNotFoundError, ControllerUnavailableError, DeadlineExceededError,
                          ExecutionError, FailedPreconditionError, HostLostError,
                          InvalidArgumentError, NotFoundError, PathwaysError, PermissionDeniedError,
                          ResourceExhaustedError, SliceUnavailableError, UnauthenticatedError)
from runtime.client.array import RemoteArray
from runtime.client.client import Client, VirtualSlice
from runtime.client.function import CompiledFunction, RemoteFunction
from runtime.client.program import Program
from runtime.cluster.local import LocalCluster
from runtime.cluster.process import ProcessCluster
from runtime.metrics import record_training, serve_metrics

__all__ = [
    "ArrayNotFoundError", "Client", "CompiledFunction", "ControllerUnavailableError",
    "DeadlineExceededError", "ExecutionError", "FailedPreconditionError", "HostLostError",
    "InvalidArgumentError", "LocalCluster", "NotFoundError", "PathwaysError",
    "PermissionDeniedError", "ProcessCluster", "Program", "RayCluster", "RemoteArray",
    "RemoteFunction", "ResourceExhaustedError", "SliceUnavailableError", "UnauthenticatedError",
    "VirtualSlice", "record_training", "serve_metrics",
]


def __getattr__(name: str):
    # RayCluster lives apart so that `import runtime` never imports Ray (an optional extra).
    if name == "RayCluster":
        from runtime.cluster.ray_cluster import RayCluster

        return RayCluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
