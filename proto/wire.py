"""Conversions between Python values and their wire form: dtypes, shardings, shards and chunked arrays.

An array travels as a stream of `ArrayChunk` messages: the array's spec, then for each distinct
shard a header (its index in the global array and the mesh positions that hold it) followed by its
raw bytes cut into chunks small enough for gRPC's message limit. Replicated shards travel once per
host, not once per device. Between processes of one machine a shard's bytes may instead lie in a
shared-memory segment of the sender (proto.shm), named in its header (`shared_array`), or in the
sender's own memory, which the receiver reads (proto.cma, `process_address`): the header alone
travels.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterable, Iterator, Sequence

import jax
import ml_dtypes
import numpy as np
from jax.sharding import PartitionSpec

from proto import cma as _cma
from proto import pathways_pb2 as pb
from proto import shm as _shm
from proto.chunk_codec import DataChunk
from proto.config import TransferConfig, from_env
from proto.errors import InvalidArgumentError

#: Bytes of array data per message; well under gRPC's default 4 MiB limit.
CHUNK_BYTES = from_env(TransferConfig).chunk_bytes
#: Message size limit the runtime's servers and channels accept (a chunk plus its headers).
MAX_MESSAGE_BYTES = 16 << 20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64", "complex64", "complex128")
}
#: JAX's narrow floating-point types (one byte or two per element, as NumPy holds them).
_NARROW = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3b11fnuz", "float8_e4m3fnuz",
           "float8_e5m2fnuz", "float8_e3m4", "float8_e4m3", "float8_e8m0fnu")
_DTYPES.update({name: np.dtype(getattr(ml_dtypes, name)) for name in _NARROW
                if hasattr(ml_dtypes, name)})
#: Sub-byte types do not cross the boundary: JAX's ahead-of-time compiled executables (what hosts
#: run) refuse sub-byte arguments laid out as device_put lays them out.
_SUB_BYTE = ("int4", "uint4", "int2", "uint2", "float4_e2m1fn")
#: Refuse arrays with more dimensions than this (hostile input).
MAX_RANK = 32


def dtype_from_name(name: str) -> np.dtype:
    """The NumPy dtype for a wire dtype name; InvalidArgumentError for anything unsupported."""
    try:
        return _DTYPES[name]
    except KeyError:
        if name in _SUB_BYTE:
            raise InvalidArgumentError(
                f"sub-byte dtype {name} cannot be put, fetched, or be an argument or result of a "
                f"compiled function; convert it at the boundary (e.g. to int8) and use {name} "
                f"inside functions") from None
        raise InvalidArgumentError(f"unsupported dtype {name!r}") from None


def dtype_name(dtype) -> str:
    """The wire name of a NumPy/JAX dtype (native byte order: the wire's bytes are
    little-endian, and JAX refuses other orders too)."""
    dtype = np.dtype(dtype)
    if not dtype.isnative and dtype.itemsize > 1:
        raise InvalidArgumentError(f"dtype {dtype.str} is not in native byte order")
    dtype_from_name(dtype.name)
    return dtype.name


def spec_to_proto(slice_id: int, spec: PartitionSpec | None) -> pb.Sharding:
    """A PartitionSpec on a slice as a `Sharding` message."""
    dims = []
    for entry in (spec or PartitionSpec()):
        if entry is None:
            axes: tuple[str, ...] = ()
        elif isinstance(entry, str):
            axes = (entry,)
        else:
            axes = tuple(entry)
        dims.append(pb.DimSharding(axes=axes))
    return pb.Sharding(slice_id=slice_id, dims=dims)


def spec_from_proto(sharding: pb.Sharding) -> PartitionSpec:
    """The PartitionSpec of a `Sharding` message."""
    entries = []
    for dim in sharding.dims:
        axes = tuple(dim.axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def sharding_dims(sharding: pb.Sharding) -> tuple[tuple[str, ...], ...]:
    """A sharding's dims without trailing unsplit entries: equal for specs that shard alike."""
    dims = [tuple(d.axes) for d in sharding.dims]
    while dims and not dims[-1]:
        dims.pop()
    return tuple(dims)


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Shape and axis names of a slice's mesh (what shard geometry needs; no devices)."""

    shape: tuple[int, ...]
    axis_names: tuple[str, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def axis_size(self, name: str) -> int:
        return self.shape[self.axis_names.index(name)]


def check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Validates a wire shape (non-negative, bounded rank)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise InvalidArgumentError(f"invalid shape {shape}")
    return shape


#: A shard's place in its global array: (start, stop) per dimension.
Index = tuple[tuple[int, int], ...]


def as_slices(index: Index) -> tuple[slice, ...]:
    """The NumPy indexing form of a shard index."""
    return tuple(slice(a, b) for a, b in index)


def contiguous_offset(shape: Sequence[int], index: Index, itemsize: int) -> int | None:
    """The byte offset of region `index` in a row-major array of `shape`, when the region is
    one contiguous run of its bytes (whole trailing dimensions behind a run of one row, as a
    shard cut along leading axes is); None otherwise."""
    offset, stride, partial = 0, itemsize, False
    for (start, stop), n in reversed(list(zip(index, shape))):
        if partial and stop - start > 1:
            return None  # a dimension cut before this one: the rows are apart
        partial = partial or (start, stop) != (0, n)
        offset += start * stride
        stride *= n
    return offset


def slice_shard_groups(shape: Sequence[int], info: pb.SliceInfo, sharding: pb.Sharding
                       ) -> list[tuple[Index, list[int]]]:
    """`shard_groups` over the mesh of a slice's definition (its mesh_shape and axis_names)."""
    return shard_groups(shape, MeshShape(tuple(info.mesh_shape), tuple(info.axis_names)),
                        sharding)


def shard_groups(shape: Sequence[int], mesh: MeshShape, sharding: pb.Sharding
                 ) -> list[tuple[Index, list[int]]]:
    """Distinct shards of an array: (index, mesh positions holding it), in mesh order.

    Raises InvalidArgumentError when the sharding names unknown axes, uses an axis twice, has more
    entries than the array has dimensions, or splits a dimension unevenly.
    """
    shape = check_shape(shape)
    dims = [tuple(d.axes) for d in sharding.dims]
    if len(dims) > len(shape):
        raise InvalidArgumentError(f"sharding has {len(dims)} entries for an array of rank {len(shape)}")
    used = [a for axes in dims for a in axes]
    for axis in used:
        if axis not in mesh.axis_names:
            raise InvalidArgumentError(f"sharding names axis {axis!r}, mesh has {mesh.axis_names}")
    if len(set(used)) != len(used):
        raise InvalidArgumentError(f"sharding uses a mesh axis twice: {used}")
    dims += [()] * (len(shape) - len(dims))
    parts = [math.prod(mesh.axis_size(a) for a in axes) for axes in dims]
    for size, n in zip(shape, parts):
        if size % n:
            raise InvalidArgumentError(f"dimension of size {size} does not split into {n} shards")
    groups: dict[Index, list[int]] = {}
    for position, coords in enumerate(np.ndindex(*mesh.shape)):
        coord = dict(zip(mesh.axis_names, coords))
        index = []
        for size, axes, n in zip(shape, dims, parts):
            part = 0
            for a in axes:  # major to minor, as in a PartitionSpec tuple
                part = part * mesh.axis_size(a) + coord[a]
            step = size // n
            index.append((part * step, (part + 1) * step))
        groups.setdefault(tuple(index), []).append(position)
    return list(groups.items())


def index_to_proto(index: Index) -> pb.ShardIndex:
    return pb.ShardIndex(start=[a for a, _ in index], stop=[b for _, b in index])


def index_from_proto(index: pb.ShardIndex) -> Index:
    if len(index.start) != len(index.stop):
        raise InvalidArgumentError("shard index has unequal start and stop lengths")
    return tuple((int(a), int(b)) for a, b in zip(index.start, index.stop))


def index_inside(index: Index, shape: Sequence[int]) -> bool:
    """Whether `index` ((start, stop) per dimension) is a region of an array of `shape`."""
    return len(index) == len(shape) and all(0 <= a <= b <= d for (a, b), d in zip(index, shape))


def shard_shape(index: Index) -> tuple[int, ...]:
    return tuple(b - a for a, b in index)


def mark_part(first: pb.ArrayChunk, part: tuple[int, int]) -> None:
    """Marks a put's first message as one of `part` = (parts, put) streams of one put
    (ArrayChunk.parts, ArrayChunk.put); (0, 0) or one part: a put of its own."""
    if part[0] > 1:
        first.parts, first.put = part


def iter_chunks(spec: pb.ArraySpec | None,
                shards: Iterable[tuple[Index, Sequence[int], np.ndarray]], parts: int = 0, *,
                put: int = 0, views: bool = False) -> Iterator[pb.ArrayChunk | DataChunk]:
    """Chunk messages for shards given as (index, mesh positions, data); `spec` leads if given
    (with `parts`: this stream is one of that many carrying a host's shards, ArrayChunk.parts, of
    the put numbered `put`, ArrayChunk.put).
    With `views`, each message is a proto.chunk_codec.DataChunk whose data is a view of the
    shard's bytes (for stubs and servers that send through proto.chunk_codec: no copy here);
    otherwise an ArrayChunk holding a copy of them."""
    first = True
    for index, positions, data in shards:
        raw = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        header = pb.ShardHeader(index=index_to_proto(index), nbytes=raw.nbytes,
                                mesh_positions=positions)
        offset = 0
        while True:
            piece = raw[offset:offset + CHUNK_BYTES]
            head = pb.ArrayChunk(shard=header if offset == 0 else None)
            if first and spec is not None:
                head.spec.CopyFrom(spec)
                head.parts, head.put = parts, put
            first = False
            if views:
                yield DataChunk(head, piece)
            else:
                head.data = bytes(piece)
                yield head
            offset += len(piece)
            if offset >= raw.nbytes:
                break


@dataclasses.dataclass
class ReceivedShard:
    """One shard assembled from a chunk stream."""

    index: Index
    positions: list[int]
    data: np.ndarray


def assemble_chunks(chunks: Iterable[pb.ArrayChunk | DataChunk], dtype: np.dtype | None = None,
                    segments: _shm.OpenSegments | None = None, target: np.ndarray | None = None,
                    bulk=None) -> tuple[pb.ArraySpec | None, list[ReceivedShard]]:
    """Reassembles shards from a chunk stream, checking sizes; returns (spec or None, shards).

    With `segments`, a shard may lie in a peer's shared-memory segment (ShardHeader.shared_array):
    its data is then a read-only view of its region there, valid while `segments` is open; or in
    the memory of a peer on this machine (ShardHeader.process_address): its data is then read from
    there (proto.cma) into memory of this process a device buffer may take. With
    `target` (the whole array being read), a shard whose region of it is contiguous is assembled
    in place there: its data is that region. With `bulk` (a host's runtime.worker.bulk.Incoming),
    a shard's bytes may come over the bulk channel (ShardHeader.bulk_ticket): its data is the
    buffer `bulk.expect(ticket, nbytes)` gives, filled once `bulk.wait()` returns."""
    spec: pb.ArraySpec | None = None
    shards: list[ReceivedShard] = []
    buffer: np.ndarray | None = None
    filled = 0
    for i, chunk in enumerate(chunks):
        if i == 0 and chunk.HasField("spec"):
            spec = chunk.spec
            dtype = dtype_from_name(spec.dtype)
            check_shape(spec.shape)
        if chunk.HasField("shard"):
            if buffer is not None and filled != buffer.nbytes:
                raise InvalidArgumentError(f"shard truncated: {filled} of {buffer.nbytes} bytes")
            if dtype is None:
                raise InvalidArgumentError("array stream does not start with its spec")
            index = index_from_proto(chunk.shard.index)
            if spec is not None and not index_inside(index, spec.shape):
                # Checked before anything is allocated: a hostile header cannot ask for memory.
                raise InvalidArgumentError(f"shard {index} lies outside the array's shape "
                                           f"{tuple(spec.shape)}")
            sshape = check_shape(shard_shape(index))
            nbytes = math.prod(sshape) * dtype.itemsize
            if chunk.shard.nbytes != nbytes:
                raise InvalidArgumentError(
                    f"shard header says {chunk.shard.nbytes} bytes, shape {sshape} of {dtype} "
                    f"is {nbytes}")
            if chunk.shard.shared_file:
                raise InvalidArgumentError("shard files (ShardHeader.shared_file) are not "
                                           "accepted: shared memory travels as segments")
            if chunk.shard.process_address:
                if segments is None or spec is None or chunk.data:
                    raise InvalidArgumentError("shards in the sender's memory are not accepted "
                                               "here")
                data = _shm.HOST_BUFFERS.empty(sshape, dtype)  # a device buffer may alias it
                _cma.read(chunk.shard.process_segment, chunk.shard.process_address, data)
                shards.append(ReceivedShard(index, list(chunk.shard.mesh_positions), data))
                buffer, filled = None, 0  # data chunks may not follow it
                continue
            if chunk.shard.shared_array:
                if segments is None or spec is None or chunk.data:
                    raise InvalidArgumentError("shared-memory shards are not accepted here")
                whole = segments.array(chunk.shard.shared_array, dtype, tuple(spec.shape))
                shards.append(ReceivedShard(index, list(chunk.shard.mesh_positions),
                                            whole[(*as_slices(index), ...)]))
                buffer, filled = None, 0  # data chunks may not follow it
                continue
            if chunk.shard.bulk_ticket:
                if bulk is None or spec is None or chunk.data:
                    raise InvalidArgumentError("bulk-channel shards are not accepted here")
                raw = bulk.expect(chunk.shard.bulk_ticket, nbytes)
                shards.append(ReceivedShard(index, list(chunk.shard.mesh_positions),
                                            raw.view(dtype).reshape(sshape)))
                buffer, filled = None, 0  # data chunks may not follow it
                continue
            region = None if target is None else target[(*as_slices(index), ...)]
            if (region is not None and region.shape == sshape and region.dtype == dtype
                    and region.flags.c_contiguous):
                buffer = region.reshape(-1).view(np.uint8)
            else:
                buffer = _shm.HOST_BUFFERS.empty((nbytes,), np.uint8)  # a device buffer may alias it
            filled = 0
            shards.append(ReceivedShard(index, list(chunk.shard.mesh_positions),
                                        buffer.view(dtype).reshape(sshape)))
        elif buffer is None:
            raise InvalidArgumentError("array data arrived before any shard header")
        n = len(chunk.data)
        if filled + n > buffer.nbytes:
            raise InvalidArgumentError("shard has more bytes than its header says")
        buffer[filled:filled + n] = np.frombuffer(chunk.data, np.uint8)
        filled += n
    if buffer is not None and filled != buffer.nbytes:
        raise InvalidArgumentError(f"shard truncated: {filled} of {buffer.nbytes} bytes")
    return spec, shards


#: jaxlib builds an array's list of per-device arrays (behind `addressable_shards`) lazily, and
#: threads doing so at once can get it short or doubled (jax 0.10: two concurrent reads of two
#: shards of a new array on a host, one found a single shard and refused the other); so a host
#: lists an array's shards one thread at a time.
_SHARDS_LOCK = threading.Lock()


def addressable_blocks(value: jax.Array) -> list[tuple[Index, jax.Device, jax.Array]]:
    """(block as (start, stop) per dimension, device, data) of each of the array's shards on this
    process's devices; safe to call from several threads at once (clients, hosts and their
    transfer threads all list shards through here)."""
    with _SHARDS_LOCK:
        return [(tuple((s.start or 0, n if s.stop is None else s.stop)
                       for s, n in zip(shard.index, value.shape)), shard.device, shard.data)
                for shard in value.addressable_shards]


def distinct_blocks(value: jax.Array) -> dict[Index, jax.Array]:
    """Each block of the array held on this process's devices, once (a replicated block's first
    copy), by its (start, stop) per dimension."""
    blocks: dict[Index, jax.Array] = {}
    for block, _, data in addressable_blocks(value):
        blocks.setdefault(block, data)
    return blocks
