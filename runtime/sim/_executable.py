"""What a simulated host keeps of a loaded executable: its duration and where its outputs lie."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from proto import pathways_pb2 as pb
from proto import wire as _wire
from proto.errors import PathwaysError
from runtime.sim._arrays import SimArray


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where an array of one spec lies on this host: its distinct local shards and their bytes
    on the host's devices (replicas counted)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    indices: tuple[_wire.Index, ...]
    nbytes: int

    @classmethod
    def of(cls, shape: Sequence[int], dtype_name: str, sharding: pb.Sharding,
           info: pb.SliceInfo, host: int) -> Layout:
        dtype = _wire.dtype_from_name(dtype_name)
        shape = _wire.check_shape(shape)
        local = {p for p, d in enumerate(info.devices) if d.host == host}
        indices, nbytes = [], 0
        for index, positions in _wire.slice_shard_groups(shape, info, sharding):
            here = len(local.intersection(positions))
            if here:
                indices.append(index)
                nbytes += math.prod(_wire.shard_shape(index)) * dtype.itemsize * here
        return cls(shape, dtype, tuple(indices), nbytes)

    def computed(self, ready_at: float) -> SimArray:
        """An output of a simulated computation: shapes only."""
        return SimArray(self.shape, self.dtype, {i: None for i in self.indices}, ready_at,
                        self.nbytes)


@dataclasses.dataclass
class Executable:
    """An executable as this host runs it."""

    name: str
    seconds: float = 0.0
    error: PathwaysError | None = None
    outputs: tuple[Layout, ...] = ()
    donated: tuple[int, ...] = ()
    info: pb.SliceInfo | None = None
    devices: int = 0  # of this host
    skip: bool = False  # no device of its slice is on this host
    hosts: frozenset[int] = frozenset()  # of its slice
