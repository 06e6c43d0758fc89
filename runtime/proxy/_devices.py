"""The islands' devices as JAX sees them through the proxy: ids, attributes, memories.

Device ids are given in island, host and local-device order (island 0's first host's devices
first), so they stay the same for every session of a cluster of the same shape. Each device has one
memory, of kind "device". Every device is addressable by the client and reports the client's
process index: the client is the single controller of all of them, as in Pathways; which worker
host holds a device is in its attributes ("island", "host", "local_device"; "slice_index" is the
island, as on multi-slice TPU systems).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from proto import pathways_pb2 as pb
from proto.errors import InvalidArgumentError, NotFoundError
from proto.ifrt import ifrt_service_pb2 as ifrt
from proto.ifrt import types_pb2

#: The memory kind of every device (JAX's default kind).
MEMORY_KIND = "device"
#: What the client reports as the runtime (it shows "proxy/pathways").
RUNTIME_TYPE = "pathways"


@dataclasses.dataclass(frozen=True)
class Device:
    """One device of an island."""

    id: int
    island: int
    host: int
    local: int  # index among its host's devices
    platform: str
    kind: str

    def __str__(self) -> str:
        return (f"PathwaysDevice(id={self.id}, island={self.island}, host={self.host}, "
                f"{self.platform}:{self.local})")


class DeviceTable:
    """The devices of the cluster's hosts, by id."""

    def __init__(self, hosts: Iterable[pb.HostInfo]) -> None:
        devices = []
        for h in sorted(hosts, key=lambda h: (h.island, h.host)):
            for local in range(h.num_devices):
                devices.append(Device(len(devices), h.island, h.host, local, h.platform or "cpu",
                                      h.device_kind or h.platform or "cpu"))
        if not devices:
            raise NotFoundError("the cluster has no hosts yet")
        self.devices: tuple[Device, ...] = tuple(devices)

    def __getitem__(self, device_id: int) -> Device:
        if not 0 <= device_id < len(self.devices):
            raise InvalidArgumentError(f"device {device_id} does not exist (devices 0 to "
                                       f"{len(self.devices) - 1})")
        return self.devices[device_id]

    @property
    def platform(self) -> str:
        return self.devices[0].platform

    def island_of(self, device_ids: Sequence[int], what: str) -> int:
        """The island all of `device_ids` are on; InvalidArgumentError naming the islands when
        they span several (a computation, or a slice, lives on one island)."""
        islands = sorted({self[d].island for d in device_ids})
        if not islands:
            raise InvalidArgumentError(f"{what} has no devices")
        if len(islands) > 1:
            raise InvalidArgumentError(
                f"{what} spans devices of islands {', '.join(map(str, islands))}: a computation "
                f"or an array lives on the devices of one island (move arrays between islands "
                f"with jax.device_put)")
        return islands[0]

    def placement(self, device_ids: Sequence[int]) -> list[tuple[int, int]]:
        """(host, local device) of each device, for an explicitly placed slice."""
        return [(self[d].host, self[d].local) for d in device_ids]

    def fill_init(self, response: ifrt.InitResponse) -> None:
        """Devices and memories of an InitResponse."""
        for d in self.devices:
            device = response.all_devices.add(
                id=d.id, local_device_id=d.local, local_hardware_id=d.local,
                platform_name=d.platform, device_kind=d.kind, default_memory_id=d.id,
                memory_ids=[d.id], debug_string=str(d), to_string=str(d))
            for name, value in (("island", d.island), ("host", d.host),
                                ("local_device", d.local), ("slice_index", d.island)):
                device.attributes.attributes[name].int64_value = value
            response.primary_device_ids.append(d.id)
            response.addressable_device_ids.append(d.id)
            response.memories.add(
                id=d.id, memory_space_kind=MEMORY_KIND, kind_id=0, device_ids=[d.id],
                debug_string=f"{MEMORY_KIND} memory of {d}", to_string=f"Memory({MEMORY_KIND}, "
                                                                       f"device {d.id})")


def attribute_value(value: types_pb2.AttributeMapProto.Value):
    """The Python value of one attribute (bytes, bool, int, float or list of ints)."""
    kind = value.WhichOneof("value")
    if kind == "int64_list_value":
        return list(value.int64_list_value.elements)
    return getattr(value, kind) if kind else None
