"""Where a value lives and whether it fits there: shard geometry against the slice's mesh, and
bytes against its devices' memory.

The controller checks every array it is told about (a put's declaration, a transfer's copy, a
program's values, an executable's inputs and outputs) here, before any host sees it: an array that
cannot fit on its devices fails at registration with RESOURCE_EXHAUSTED naming its sizes, instead
of a host failing to allocate it later (a float32[1e6, 1e6] put once reached a host and came back
as UNKNOWN). The checks read only immutable slice records and the host registry (which has its own
lock), so callers run them outside the controller's lock: the work is the request's own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from proto import pathways_pb2 as pb
from proto import wire as _wire
from proto.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from scheduler.resources import ResourceManager, SliceRecord

#: No array may hold this many bytes or more, whatever its devices (sizes must fit int64 math).
MAX_ARRAY_BYTES = 1 << 62


@dataclasses.dataclass(frozen=True)
class Placement:
    """A value's place: its slice's island, bytes on each device, and device bytes in all
    (replicas counted, which is what a session's quota counts)."""

    island: int
    slice_id: int
    device_bytes: int
    total_bytes: int
    hosts: frozenset[int] = frozenset()  # hosts of the island holding a part of it


def device_capacity(resources: ResourceManager, record: SliceRecord) -> int:
    """Memory of the smallest device of a slice, in bytes (0: unknown)."""
    hosts = {h.host: h.device_memory_bytes for h in resources.island_hosts(record.island)}
    sizes = [hosts.get(host, 0) for host in {host for host, _ in record.devices}]
    return min(sizes) if sizes and all(sizes) else 0


def describe(dtype: str, shape: Sequence[int]) -> str:
    return f"{dtype}[{','.join(map(str, shape))}]"


def place(record: SliceRecord, capacity: int, dtype: str, shape: Sequence[int],
          sharding: pb.Sharding, what: str) -> Placement:
    """Checks a value of `dtype` and `shape` sharded as `sharding` on the slice `record` whose
    devices hold `capacity` bytes each (0: unknown). InvalidArgumentError for an unknown dtype, a
    malformed shape or sharding, or an array of 2^62 bytes or more; ResourceExhaustedError when
    one device's shard does not fit its device."""
    itemsize = _wire.dtype_from_name(dtype).itemsize
    groups = _wire.shard_groups(shape, _wire.MeshShape(record.mesh_shape, record.axis_names),
                                sharding)
    total = math.prod(int(d) for d in shape) * itemsize
    if total >= MAX_ARRAY_BYTES:
        raise InvalidArgumentError(f"{what}: {describe(dtype, shape)} would be {total} bytes, "
                                   f"more than any array may hold ({MAX_ARRAY_BYTES})")
    shard = _wire.shard_shape(groups[0][0])  # the shards of an even split are all alike
    per_device = math.prod(shard) * itemsize
    if capacity and per_device > capacity:
        raise ResourceExhaustedError(
            f"{what}: {describe(dtype, shape)} needs {per_device} bytes on each device of slice "
            f"{record.slice_id} (a {describe(dtype, shard)} shard per device); its devices hold "
            f"{capacity} bytes each")
    return Placement(record.island, record.slice_id, per_device, per_device * record.size,
                     frozenset(host for host, _ in record.devices))


class Placer:
    """Places values on the slices of one session, reading the slice registry as it goes (each
    slice's capacity looked up once)."""

    def __init__(self, resources: ResourceManager, session_id: int) -> None:
        self.resources, self.session_id = resources, session_id
        self._slices: dict[int, tuple[SliceRecord, int]] = {}

    def slice(self, slice_id: int) -> tuple[SliceRecord, int]:
        """A slice of the session and its devices' capacity; NotFoundError for any other."""
        known = self._slices.get(slice_id)
        if known is None:
            record = self.resources.get_slice(slice_id)
            if record.session_id != self.session_id:
                raise NotFoundError(f"slice {slice_id} is unknown or was released")
            known = self._slices[slice_id] = (record, device_capacity(self.resources, record))
        return known

    def place(self, dtype: str, shape: Sequence[int], sharding: pb.Sharding,
              what: str) -> Placement:
        record, capacity = self.slice(sharding.slice_id)
        return place(record, capacity, dtype, shape, sharding, what)
