"""Compiling a Load instruction's program for this host's devices: jax.export modules and plain
StableHLO (proto.stablehlo), and what the executor keeps of each (`Loaded`)."""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from proto import pathways_pb2 as pb
from proto import stablehlo as _stablehlo
from proto import wire as _wire
from proto.errors import InvalidArgumentError, PathwaysError


@dataclasses.dataclass
class Loaded:
    """An executable compiled for this host's devices."""

    name: str
    compiled: object  # jax.stages.Compiled, or None when loading failed
    error: PathwaysError | None
    out_nbytes: tuple[int, ...]  # bytes of each output on this host's devices
    donated: tuple[int, ...]
    devices: int = 0  # devices of this host it runs on
    slice_id: int = 0
    skip: bool = False  # this host holds no device of the slice: nothing to do here
    multi_host: bool = False  # the slice spans hosts (its collectives cross processes)
    overlap: bool = False  # no collectives: may run while the previous execution finishes
    cache_key: tuple | None = None  # its compilation's, shared by alike loads


def host_nbytes(value: pb.ValueSpec, info: pb.SliceInfo, host: int) -> int:
    """Bytes a value of this spec occupies on one host's devices of the slice."""
    shape = tuple(value.shape)
    groups = _wire.slice_shard_groups(shape, info, value.sharding)
    itemsize = _wire.dtype_from_name(value.dtype).itemsize
    on_host = {p for p, d in enumerate(info.devices) if d.host == host}
    return sum(int(np.prod(_wire.shard_shape(index), dtype=np.int64)) * itemsize
               * len(on_host.intersection(positions)) for index, positions in groups)


def compile_export(load: pb.LoadInstruction, mesh: Mesh):
    """Deserializes StableHLO and compiles it for the mesh's devices."""
    if hashlib.sha256(load.serialized).hexdigest() != load.fingerprint:
        raise InvalidArgumentError(f"{load.name}: serialized bytes do not match their fingerprint")
    try:
        exported = jax.export.deserialize(bytearray(load.serialized))
    except Exception as exc:
        raise InvalidArgumentError(f"{load.name}: not a serialized jax.export module: {exc}") from exc
    in_shardings = tuple(NamedSharding(mesh, _wire.spec_from_proto(v.sharding)) for v in load.inputs)
    out_shardings = tuple(NamedSharding(mesh, _wire.spec_from_proto(v.sharding))
                          for v in load.outputs)
    avals = [jax.ShapeDtypeStruct(tuple(v.shape), _wire.dtype_from_name(v.dtype), sharding=s)
             for v, s in zip(load.inputs, in_shardings)]
    fn = jax.jit(exported.call, in_shardings=in_shardings, out_shardings=out_shardings,
                 donate_argnums=tuple(load.donated))
    return fn.lower(*avals).compile()


def compile_stablehlo(load: pb.LoadInstruction, mesh: Mesh) -> _stablehlo.StableHLOExecutable:
    """Compiles a StableHLO module with the client's options for the mesh's devices
    (proto.stablehlo), its outputs laid out as the load's output specs."""
    if _stablehlo.fingerprint(load.serialized, load.compile_options) != load.fingerprint:
        raise InvalidArgumentError(f"{load.name}: module bytes do not match their fingerprint")
    executable = _stablehlo.compile_module(load.serialized, load.compile_options,
                                           list(mesh.devices.flat))
    in_shardings, out_shardings = ([NamedSharding(mesh, _wire.spec_from_proto(v.sharding))
                                    for v in values] for values in (load.inputs, load.outputs))
    _stablehlo.check_shardings(executable, load.name, in_shardings, out_shardings,
                               [len(v.shape) for v in load.inputs],
                               [len(v.shape) for v in load.outputs])
    return _stablehlo.StableHLOExecutable(
        executable, out_shardings,
        [(tuple(v.shape), _wire.dtype_from_name(v.dtype)) for v in load.outputs])
