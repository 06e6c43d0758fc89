"""The runtime as a system of the dispatch micro-benchmark (benchmarks.dispatch_baselines).

The island is a real worker subprocess (as `pathways up` starts it); the controller runs in this
process beside the client, so every computation crosses two gRPC hops, as in the paper's set-up.
It runs exactly the baselines' functions: `make_step`/`make_fused` exported for the slice's mesh.
"""

from __future__ import annotations

import time

import numpy as np
from jax.sharding import PartitionSpec

import runtime
from benchmarks.dispatch_baselines import (MATMUL_DIM, PROGRAM_LENGTH, initial_values, make_fused,
                                           make_step)
from runtime.client.client import RPC_TIMEOUT_S

AXIS = "slice"
#: A timed run's fetch waits this many times the run's expected length (from the last run).
DEADLINE_RUNS = 20


class RuntimeSystem:
    """Dispatches the benchmark's chain through the controller to a one-island worker process.

    OpByOp: one compiled-function call per computation (queued asynchronously, shipped in batches).
    Chained: a traced program of `length` calls, one command per program. Fused: one call of the
    fused function per program. A timed run's deadline scales with the time per call measured so
    far (a busy machine slows a run down; it does not fail it). `worker_log`: a file for the
    worker's output.
    """

    name = "runtime"

    def __init__(self, n_devices: int, *, n: int = MATMUL_DIM, address: str | None = None,
                 worker_log: str | None = None) -> None:
        self.n_devices = n_devices
        self._seconds_per_call: dict[object, float] = {}
        self._cluster = None if address else runtime.ProcessCluster(
            islands=1, hosts_per_island=1, devices_per_host=n_devices, worker_log=worker_log)
        self.client = runtime.Client(address or self._cluster.address, name="dispatch-bench")
        self.slice = self.client.slice({AXIS: n_devices})
        self._n = n
        spec = PartitionSpec(AXIS)
        x0, w = initial_values(n_devices, n)
        self._x, self._w = self.client.put((x0, w), self.slice, spec)
        self._functions: dict[tuple, object] = {}

    def _function(self, kind: str, k: int = 0, length: int = 1):
        key = (kind, k, length)
        fn = self._functions.get(key)
        if fn is None:
            spec = PartitionSpec(AXIS)
            if kind == "chained":
                step = self._function("step")

                def chain(x, w):
                    for _ in range(length):
                        x = step(x, w)
                    return x

                fn = self.client.program(chain, name=f"chain{length}")
            else:
                jitted = (make_step(self.slice.mesh, k, n=self._n) if kind == "step"
                          else make_fused(self.slice.mesh, length, k, n=self._n))
                fn = self.client.jit(jitted, self.slice, in_specs=spec, out_specs=spec,
                                     name=f"{kind}{length}_k{k}")
            self._functions[key] = fn
        return fn

    def _timed(self, fn, calls: int) -> float:
        per_call = self._seconds_per_call.get(fn)
        timeout = max(RPC_TIMEOUT_S, DEADLINE_RUNS * calls * per_call) if per_call else None
        start = time.perf_counter()
        x = self._x
        for _ in range(calls):
            x = fn(x, self._w)
        x.fetch(timeout)  # waits for the last computation (a few bytes: the chain value)
        self._x = x
        elapsed = time.perf_counter() - start
        self._seconds_per_call[fn] = elapsed / calls
        return elapsed

    def opbyop(self, n_computations: int) -> float:
        return self._timed(self._function("step"), n_computations)

    def chained(self, n_programs: int, length: int = PROGRAM_LENGTH) -> float:
        return self._timed(self._function("chained", length=length), n_programs)

    def fused(self, n_programs: int, length: int = PROGRAM_LENGTH) -> float:
        return self._timed(self._function("fused", length=length), n_programs)

    def opbyop_sized(self, k: int, n_computations: int) -> float:
        return self._timed(self._function("step", k), n_computations)

    def latency_probe(self, rounds: int) -> dict:
        """Dispatch latency per stage without a backlog, by `pathways bench scale`'s own probe
        (benchmarks.scale_workload.probe_latencies: client submit -> ordered -> the host
        received the computation -> it started; p50 and p99 in ms): `rounds` OpByOp calls, one
        at a time."""
        from benchmarks.scale_workload import Chain, probe_latencies

        fn = self._function("step")
        chain = Chain(self.slice.island, self.slice, self._x, run=lambda x: fn(x, self._w),
                      addresses=list(self.slice.info.host_addresses))
        deadline = time.monotonic() + RPC_TIMEOUT_S * max(1, rounds)
        result, error = probe_latencies([chain], rounds, deadline, self.client.credentials)
        self._x = chain.x
        if error is not None:
            raise error
        return result

    def state(self) -> np.ndarray:
        return self._x.fetch()

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()
