"""IFRT shardings as runtime placements.

An IFRT sharding names devices (by id) and says which block of the array each holds: JAX sends an
HloSharding (an XLA tile assignment over a device list) for its NamedShardings, a
SingleDeviceSharding for arrays on one device. The runtime places an array on a virtual slice (a
device mesh) with a PartitionSpec. `Layout` is the common ground: the device list plus the tile
array (device positions arranged as tiles per array dimension, then replicas). `place` finds a
slice mesh over those devices, and a PartitionSpec per layout, that put every block on the same
device as the sharding does (checked position by position, never assumed).

The preferred mesh keeps the sharding's device order and splits it into prime-sized axes ("d0",
"d1", ...), so every sharding JAX derives from one Mesh fits the same slice, and arrays and the
computations that use them share it. A sharding that fits no such mesh (devices in an order no
mesh axis order gives) gets a slice of its own, shaped like its tile array.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np
from jax.sharding import PartitionSpec

from proto.config import ProxyConfig, from_env
from proto.errors import InvalidArgumentError
from proto.ifrt import types_pb2, xla_pb2
from runtime.proxy._status import UnimplementedError

HLO_SHARDING = "xla::ifrt::HloSharding"
SINGLE_DEVICE_SHARDING = "xla::ifrt::SingleDeviceSharding"
CONCRETE_EVEN_SHARDING = "xla::ifrt::ConcreteEvenSharding"
DEFAULT_MEMORY_KIND = "device"
#: Most mesh orders tried before giving a sharding a slice of its own.
MAX_MESH_CANDIDATES = from_env(ProxyConfig).max_mesh_candidates

#: A block of an array: (start, stop) per dimension.
Index = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """Which device holds which block of an array.

    `tiles` holds device positions (indices into `devices`): its first `rank` axes are the tiles
    of each array dimension, the rest are replicas. Every position appears exactly once.
    """

    devices: tuple[int, ...]
    tiles: np.ndarray
    rank: int
    memory_kind: str = DEFAULT_MEMORY_KIND

    def __post_init__(self) -> None:
        n = len(self.devices)
        if self.tiles.size != n or sorted(self.tiles.reshape(-1).tolist()) != list(range(n)):
            raise InvalidArgumentError(f"tile assignment {self.tiles.tolist()} does not place "
                                       f"each of the {n} devices once")
        if len(set(self.devices)) != n:
            raise InvalidArgumentError(f"sharding names a device twice: {list(self.devices)}")
        if self.rank > self.tiles.ndim:
            raise InvalidArgumentError("sharding has fewer tile dimensions than the array")

    @classmethod
    def replicated(cls, devices: Sequence[int], rank: int,
                   memory_kind: str = DEFAULT_MEMORY_KIND) -> Layout:
        tiles = np.arange(len(devices)).reshape((1,) * rank + (len(devices),))
        return cls(tuple(devices), tiles, rank, memory_kind)

    @property
    def tile_counts(self) -> tuple[int, ...]:
        return tuple(self.tiles.shape[:self.rank])

    @property
    def fully_replicated(self) -> bool:
        return math.prod(self.tile_counts) == 1

    def key(self) -> tuple:
        """Equal for layouts that place every block alike."""
        return (self.devices, self.tiles.shape, self.tiles.tobytes(), self.rank)

    def tile_coords(self) -> np.ndarray:
        """Per device position, the coordinates of its tile (positions x rank)."""
        coords = np.zeros((len(self.devices), self.rank), np.int64)
        for index in np.ndindex(*self.tiles.shape):
            coords[self.tiles[index]] = index[:self.rank]
        return coords

    def indices(self, shape: Sequence[int]) -> list[Index]:
        """The block each device position holds of an array of `shape`."""
        if len(shape) != self.rank:
            raise InvalidArgumentError(f"sharding of rank {self.rank} for an array of shape "
                                       f"{tuple(shape)}")
        for size, n in zip(shape, self.tile_counts):
            if size % n:
                raise InvalidArgumentError(f"dimension of size {size} does not split evenly into "
                                           f"{n} shards (the runtime holds even shards only)")
        steps = [size // n for size, n in zip(shape, self.tile_counts)]
        return [tuple((int(c) * s, (int(c) + 1) * s) for c, s in zip(coords, steps))
                for coords in self.tile_coords()]

    def with_devices(self, devices: Sequence[int]) -> Layout:
        """The same blocks on other devices (position for position)."""
        if len(devices) != len(self.devices):
            raise InvalidArgumentError(f"{len(devices)} devices for a sharding over "
                                       f"{len(self.devices)}")
        return Layout(tuple(devices), self.tiles, self.rank, self.memory_kind)

    def op_sharding(self) -> xla_pb2.OpSharding:
        """The tile assignment as an XLA OpSharding (positions, not ids)."""
        if self.fully_replicated:
            return xla_pb2.OpSharding(type=xla_pb2.OpSharding.REPLICATED)
        replicas = math.prod(self.tiles.shape[self.rank:])
        dims = list(self.tile_counts) + ([replicas] if replicas > 1 else [])
        return xla_pb2.OpSharding(type=xla_pb2.OpSharding.OTHER, tile_assignment_dimensions=dims,
                                  tile_assignment_devices=self.tiles.reshape(-1).tolist(),
                                  replicate_on_last_tile_dim=replicas > 1)

    def sharding_proto(self) -> types_pb2.ShardingProto:
        """The layout as an IFRT HloSharding."""
        hlo = types_pb2.HloShardingProto(
            devices=types_pb2.DeviceListProto(device_ids=self.devices),
            memory_kind=self.memory_kind, xla_op_sharding=self.op_sharding())
        return types_pb2.ShardingProto(serialized_sharding=types_pb2.Serialized(
            type_name=HLO_SHARDING, data=hlo.SerializeToString()))


def layout_from_op_sharding(op: xla_pb2.OpSharding, devices: Sequence[int], rank: int,
                            memory_kind: str = DEFAULT_MEMORY_KIND) -> Layout:
    """A Layout from an XLA OpSharding over `devices`; UNIMPLEMENTED for kinds the runtime cannot
    hold (single-device within several, manual, tuple, unreduced)."""
    n = len(devices)
    if op.type == xla_pb2.OpSharding.REPLICATED or (op.type == xla_pb2.OpSharding.MAXIMAL
                                                     and n == 1):
        return Layout.replicated(devices, rank, memory_kind)
    if op.type != xla_pb2.OpSharding.OTHER:
        name = xla_pb2.OpSharding.Type.Name(op.type)
        raise UnimplementedError(f"{name} shardings over {n} devices are not supported by the "
                                 f"proxy (only replicated and tiled arrays)")
    dims = list(op.tile_assignment_dimensions)
    subgroups = [xla_pb2.OpSharding.Type.Name(t) for t in op.last_tile_dims]
    if any(t != "REPLICATED" for t in subgroups):
        raise UnimplementedError(f"shardings with {', '.join(subgroups)} subgroups are not "
                                 f"supported by the proxy")
    if math.prod(dims) != n:
        raise InvalidArgumentError(f"tile assignment {dims} does not cover {n} devices")
    if op.iota_reshape_dims:
        order = np.arange(n).reshape(list(op.iota_reshape_dims))
        order = order.transpose(list(op.iota_transpose_perm) or None)
    else:
        order = np.asarray(op.tile_assignment_devices, np.int64)
    tiles = order.reshape(dims)
    array_rank = len(dims) - int(op.replicate_on_last_tile_dim) - len(subgroups)
    if array_rank != rank:
        raise InvalidArgumentError(f"sharding tiles {array_rank} dimensions of an array of rank "
                                   f"{rank}")
    return Layout(tuple(devices), tiles, rank, memory_kind)


def parse_sharding(proto: types_pb2.ShardingProto, rank: int) -> Layout:
    """The Layout of an IFRT sharding for an array of rank `rank`."""
    serialized = proto.serialized_sharding
    kind = serialized.type_name
    try:
        if kind == SINGLE_DEVICE_SHARDING:
            single = types_pb2.SingleDeviceShardingProto.FromString(serialized.data)
            return Layout.replicated([single.device_id], rank, _memory_kind(single))
        if kind == HLO_SHARDING:
            hlo = types_pb2.HloShardingProto.FromString(serialized.data)
            return layout_from_op_sharding(hlo.xla_op_sharding, list(hlo.devices.device_ids),
                                           rank, _memory_kind(hlo))
        if kind == CONCRETE_EVEN_SHARDING:
            even = types_pb2.ConcreteEvenShardingProto.FromString(serialized.data)
            if even.is_fully_replicated or list(even.shard_shape.dims) == list(even.shape.dims):
                return Layout.replicated(list(even.devices.device_ids), rank, _memory_kind(even))
            raise UnimplementedError("ConcreteEvenSharding of split arrays is not supported by "
                                     "the proxy (its blocks have no defined devices)")
    except ValueError as exc:  # protobuf DecodeError
        raise InvalidArgumentError(f"{kind} does not parse: {exc}") from None
    raise UnimplementedError(f"sharding {kind or '(none)'} is not supported by the proxy "
                             f"(HloSharding, SingleDeviceSharding and replicated "
                             f"ConcreteEvenSharding are)")


def _memory_kind(proto) -> str:
    kind = proto.memory_kind if proto.HasField("memory_kind") else DEFAULT_MEMORY_KIND
    if kind not in ("", DEFAULT_MEMORY_KIND):
        raise UnimplementedError(f"memory kind {kind!r} is not supported by the proxy (only "
                                 f"{DEFAULT_MEMORY_KIND!r})")
    return DEFAULT_MEMORY_KIND


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where layouts live in the runtime: a slice mesh over `devices` (ids, in the mesh's row-major
    order) and one PartitionSpec per layout."""

    devices: tuple[int, ...]
    mesh_shape: tuple[int, ...]
    specs: tuple[PartitionSpec, ...]

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(f"d{i}" for i in range(len(self.mesh_shape)))

    @property
    def slice_key(self) -> tuple:
        return (self.devices, self.mesh_shape)


def place(layouts: Sequence[Layout], what: str) -> Placement:
    """One slice mesh over the layouts' common device list, and each layout's spec on it.

    A single layout that fits no mesh in its device order gets a mesh shaped like its tile array;
    several that share no mesh are UNIMPLEMENTED (a computation runs on one slice).
    """
    devices = layouts[0].devices
    if any(layout.devices != devices for layout in layouts):
        raise InvalidArgumentError(f"{what}: its arrays are on different device lists")
    for mesh_shape in _mesh_candidates(len(devices)):
        specs = [_spec_on(layout, mesh_shape) for layout in layouts]
        if all(spec is not None for spec in specs):
            return Placement(devices, mesh_shape, tuple(specs))
    if len(layouts) == 1:
        return _own_mesh(layouts[0])
    raise UnimplementedError(f"{what}: its input and output shardings fit no one device mesh "
                             f"over devices {list(devices)}")


def _own_mesh(layout: Layout) -> Placement:
    """A mesh shaped like the layout's tile array (size-1 axes dropped), its devices in tile order."""
    shape = layout.tiles.shape
    kept = [i for i, size in enumerate(shape) if size > 1]
    if not kept:
        return Placement(layout.devices, (1,), (PartitionSpec(),))
    devices = tuple(layout.devices[p] for p in layout.tiles.reshape(-1))
    names = {dim: f"d{k}" for k, dim in enumerate(kept)}
    spec = PartitionSpec(*(names.get(j) for j in range(layout.rank)))
    return Placement(devices, tuple(shape[i] for i in kept), (spec,))


def _mesh_candidates(n: int) -> Iterator[tuple[int, ...]]:
    """Mesh shapes over n devices in their given order: the prime factors of n, in each distinct
    order (a mesh axis of a composite size is several of these, joined in a spec)."""
    factors = _prime_factors(n)
    if not factors:
        yield (1,)
        return
    seen = 0
    for order in _distinct_permutations(sorted(factors, reverse=True)):
        yield tuple(order)
        seen += 1
        if seen >= MAX_MESH_CANDIDATES:
            return


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def _distinct_permutations(items: list[int]) -> Iterator[list[int]]:
    if len(items) <= 1:
        yield list(items)
        return
    for value in dict.fromkeys(items):
        rest = list(items)
        rest.remove(value)
        for tail in _distinct_permutations(rest):
            yield [value, *tail]


def _spec_on(layout: Layout, mesh_shape: tuple[int, ...]) -> PartitionSpec | None:
    """The spec that places the layout's blocks on a mesh of `mesh_shape` over its devices (in
    their order), or None when no spec does."""
    n = len(layout.devices)
    coords = np.stack(np.unravel_index(np.arange(n), mesh_shape), axis=1)  # position -> mesh coords
    tile_coords = layout.tile_coords()
    names = [f"d{i}" for i in range(len(mesh_shape))]
    entries: list = []
    used: set[int] = set()
    for j, count in enumerate(layout.tile_counts):
        if count == 1:
            entries.append(None)
            continue
        line = [layout.tiles[tuple(i if d == j else 0 for d in range(layout.tiles.ndim))]
                for i in range(count)]
        along = coords[line]
        varying = [a for a in range(len(mesh_shape)) if (along[:, a] != along[0, a]).any()]
        if not varying or used.intersection(varying):
            return None
        # The axis that changes first along the tiles is the most minor.
        changes = {a: int(np.argmax(along[:, a] != along[0, a])) for a in varying}
        order = sorted(varying, key=lambda a: -changes[a])
        if math.prod(mesh_shape[a] for a in order) != count:
            return None
        combined = np.zeros(n, np.int64)
        for a in order:
            combined = combined * mesh_shape[a] + coords[:, a]
        if not np.array_equal(combined, tile_coords[:, j]):
            return None
        used.update(order)
        entries.append(names[order[0]] if len(order) == 1 else tuple(names[a] for a in order))
    return PartitionSpec(*entries)
