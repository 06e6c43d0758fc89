"""How long a computation holds simulated devices: XLA's cost analysis of its StableHLO.

The FLOPs of an executable are counted once per process (all the hosts a process serves share the
figure), in a helper process: lowering and analysing a large module takes seconds of Python, and
in a thread it would hold the interpreter lock against the hosts' event loop, which must keep
answering the controller meanwhile. Nothing is compiled and no device is needed: the module is
lowered against the slice's abstract mesh and XLA's HLO cost analysis counts its FLOPs.

Per device: a module whose body runs in manual-sharding regions (`shard_map`) is written per
device, so its count is already per device; any other module is written for the global arrays,
and its count is divided by the slice's devices (perfect partitioning). A module that mixes both
is counted as the manual kind (its global part is then over-counted). Like XLA's own analysis, a
loop body counts once whatever its trip count: unroll loops, or set a fixed duration, where that
matters.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import multiprocessing
from collections.abc import Sequence
from concurrent import futures

from proto import pathways_pb2 as pb
from proto import wire as _wire
from proto.errors import InvalidArgumentError
from runtime.sim._config import SimConfig

#: Markers of manual-sharding regions in a module's text (Shardy's, and GSPMD's shard_map form).
_MANUAL_MARKERS = ("sdy.manual_computation", "@SPMDFullToShardShape")


def per_device_flops(serialized: bytes, inputs: Sequence[pb.ValueSpec],
                     mesh_shape: Sequence[int], axis_names: Sequence[str]) -> float:
    """FLOPs one device of a slice of `mesh_shape` runs for the jax.export module `serialized`
    (see the module docstring). InvalidArgumentError if it is not a module or does not lower."""
    import jax
    from jax.sharding import AbstractMesh, NamedSharding

    try:
        exported = jax.export.deserialize(bytearray(serialized))
    except Exception as exc:
        raise InvalidArgumentError(f"not a serialized jax.export module: {exc}") from None
    devices = math.prod(mesh_shape)
    mesh = AbstractMesh(tuple(mesh_shape), tuple(axis_names))
    avals = []
    for value in inputs:
        dtype = _wire.dtype_from_name(value.dtype)
        sharding = (NamedSharding(mesh, _wire.spec_from_proto(value.sharding))
                    if exported.nr_devices > 1 else None)
        avals.append(jax.ShapeDtypeStruct(tuple(value.shape), dtype, sharding=sharding))
    try:
        lowered = jax.jit(exported.call).trace(*avals).lower(
            lowering_platforms=tuple(exported.platforms))
        cost = lowered.cost_analysis()
    except Exception as exc:
        raise InvalidArgumentError(f"cannot lower the module for its cost analysis: {exc}") from None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = max(0.0, float((cost or {}).get("flops", 0.0)))
    text = exported.mlir_module()
    manual = any(marker in text for marker in _MANUAL_MARKERS)
    return flops if manual or exported.nr_devices <= 1 else flops / devices


def _count(serialized: bytes, inputs: list[bytes], mesh_shape: tuple[int, ...],
           axis_names: tuple[str, ...]) -> float:
    """per_device_flops in the helper process (inputs as serialized ValueSpecs)."""
    return per_device_flops(serialized, [pb.ValueSpec.FromString(v) for v in inputs], mesh_shape,
                            axis_names)


class CostModel:
    """Durations of executables for one process's simulated hosts; each counted once.

    `seconds(load, mesh_shape, axis_names)` is awaited on the hosts' event loop; concurrent asks
    for the same executable share one count.
    """

    def __init__(self, config: SimConfig, pool: futures.Executor | None = None) -> None:
        self.config = config
        self._given_pool = pool
        self._pool = pool
        self._flops: dict[tuple, asyncio.Future] = {}

    async def seconds(self, load: pb.LoadInstruction, mesh_shape: Sequence[int],
                      axis_names: Sequence[str]) -> float:
        """Seconds one call of the executable holds each of its devices."""
        if hashlib.sha256(load.serialized).hexdigest() != load.fingerprint:
            raise InvalidArgumentError(f"{load.name}: serialized bytes do not match their "
                                       f"fingerprint")
        if self.config.fixed_seconds is not None:
            return self.config.fixed_seconds
        return await self.flops(load, mesh_shape, axis_names) / self.config.flops_per_s

    async def flops(self, load: pb.LoadInstruction, mesh_shape: Sequence[int],
                    axis_names: Sequence[str]) -> float:
        """Per-device FLOPs of the executable (counted once per process)."""
        key = (load.fingerprint, tuple(mesh_shape), tuple(axis_names),
               tuple(v.SerializeToString(deterministic=True) for v in load.inputs))
        future = self._flops.get(key)
        if future is None:
            if self._pool is None:  # started on first use: fixed durations never need it
                self._pool = futures.ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            loop = asyncio.get_running_loop()
            future = self._flops[key] = loop.run_in_executor(
                self._pool, _count, load.serialized, [v.SerializeToString() for v in load.inputs],
                tuple(mesh_shape), tuple(axis_names))
        try:
            return await asyncio.shield(future)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{load.name}: {exc}") from None

    def close(self) -> None:
        if self._pool is not None and self._pool is not self._given_pool:
            self._pool.shutdown(wait=False, cancel_futures=True)
