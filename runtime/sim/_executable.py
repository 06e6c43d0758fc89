"""What a simulated host keeps of a loaded executable: its duration and where its outputs lie."""

from __future__ import annotations

import collections
import dataclasses
import functools
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
        """The layout on `host`, from the slice-wide one (`_slice_layouts`): every host of a
        process loads the same executable, and a 256-device slice took 0.35 ms per host and
        output to lay out, which hundreds of hosts did one after another on the process's loop
        (its first commands then reached their hosts up to 0.8 s late)."""
        dtype = _wire.dtype_from_name(dtype_name)
        shape = _wire.check_shape(shape)
        indices, nbytes = _slice_layouts(
            shape, dtype_name, sharding.SerializeToString(deterministic=True),
            info.SerializeToString(deterministic=True)).get(host, ((), 0))
        return cls(shape, dtype, indices, nbytes)

    def computed(self, ready_at: float) -> SimArray:
        """An output of a simulated computation: shapes only."""
        return SimArray(self.shape, self.dtype, {i: None for i in self.indices}, ready_at,
                        self.nbytes)


@functools.lru_cache(maxsize=256)
def _slice_layouts(shape: tuple[int, ...], dtype_name: str, sharding: bytes, info: bytes
                   ) -> dict[int, tuple[tuple[_wire.Index, ...], int]]:
    """Per host of a slice: its distinct shards of an array and their bytes on its devices
    (replicas counted), in one pass over the array's shard groups (the messages serialized, to
    key the cache)."""
    itemsize = _wire.dtype_from_name(dtype_name).itemsize
    slice_info = pb.SliceInfo.FromString(info)
    host_of = [d.host for d in slice_info.devices]
    indices: dict[int, list[_wire.Index]] = collections.defaultdict(list)
    nbytes: collections.Counter[int] = collections.Counter()
    for index, positions in _wire.slice_shard_groups(shape, slice_info,
                                                     pb.Sharding.FromString(sharding)):
        size = math.prod(_wire.shard_shape(index)) * itemsize
        for host, here in collections.Counter(host_of[p] for p in positions).items():
            indices[host].append(index)
            nbytes[host] += size * here
    return {host: (tuple(held), nbytes[host]) for host, held in indices.items()}


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
