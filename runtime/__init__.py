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
"""

import os

# gRPC's core logs INFO lines (fork handlers, GOAWAY) to stderr unless told otherwise.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# Errors first: scheduler/ imports them while runtime/ is still initialising.
from runtime._errors import (ArrayNotFoundError, ControllerUnavailableError, DeadlineExceededError,
                             ExecutionError, FailedPreconditionError, HostLostError,
                             InvalidArgumentError, NotFoundError, PathwaysError,
                             PermissionDeniedError, ResourceExhaustedError, SliceUnavailableError,
                             UnauthenticatedError)
from runtime._array import RemoteArray
from runtime._client import Client, VirtualSlice
from runtime._cluster import LocalCluster, ProcessCluster
from runtime._controller import Controller, create_controller_server
from runtime._function import CompiledFunction, RemoteFunction
from runtime._metrics import record_training, serve_metrics
from runtime._program import Program
from runtime._worker import Worker, create_worker_server

__all__ = [
    "ArrayNotFoundError", "Client", "CompiledFunction", "Controller", "ControllerUnavailableError",
    "DeadlineExceededError", "ExecutionError", "FailedPreconditionError", "HostLostError",
    "InvalidArgumentError", "LocalCluster", "NotFoundError", "PathwaysError",
    "PermissionDeniedError", "ProcessCluster", "Program", "RayCluster", "RemoteArray",
    "RemoteFunction", "ResourceExhaustedError", "SliceUnavailableError", "UnauthenticatedError",
    "VirtualSlice", "Worker", "create_controller_server", "create_worker_server",
    "record_training", "serve_metrics",
]


def __getattr__(name: str):
    # RayCluster lives apart so that `import runtime` never imports Ray (an optional extra).
    if name == "RayCluster":
        from runtime._ray import RayCluster

        return RayCluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
