"""Array requests: making arrays from host buffers, reading them back, splitting and assembling
them, copying them between devices and islands, ready checks and deletion (runtime.proxy._arrays
says how each array lives in the runtime)."""

from __future__ import annotations

import math

import numpy as np

from proto import wire as _wire
from proto.errors import ArrayNotFoundError, InvalidArgumentError
from proto.ifrt import ifrt_arrays_pb2 as ifrt
from proto.ifrt import proxy_types_pb2
from runtime.proxy._arrays import ProxyArray, find, put, read, remote_of, slice_for, wait_ready
from runtime.proxy._devices import MEMORY_KIND
from runtime.proxy._dtypes import numpy_dtype
from runtime.proxy._session import Later, Session, handles
from runtime.proxy._shardings import Layout, parse_sharding, place
from runtime.proxy._status import UnimplementedError, error_of

DONATE = proxy_types_pb2.ARRAY_COPY_SEMANTICS_DONATE_INPUT


def _handle(session: Session, given: int) -> int:
    return given or session.new_handle()


def host_array(data: bytes, dtype: np.dtype, shape: tuple[int, ...],
               strides: list[int] | None) -> np.ndarray:
    """A host buffer as an array: dense row-major, or the smallest region holding `strides`."""
    count = math.prod(shape)
    if strides is None:
        if len(data) != count * dtype.itemsize:
            raise InvalidArgumentError(f"host buffer of {len(data)} bytes for {dtype}"
                                       f"{list(shape)} ({count * dtype.itemsize} bytes)")
        return np.frombuffer(data, dtype, count=count).reshape(shape)
    if len(strides) != len(shape):
        raise InvalidArgumentError(f"{len(strides)} byte strides for a rank-{len(shape)} array")
    if count == 0:
        return np.empty(shape, dtype)
    offset = sum((n - 1) * -s for n, s in zip(shape, strides) if s < 0)
    try:
        return np.ndarray(shape, dtype, buffer=data, offset=offset, strides=strides).copy()
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"host buffer does not hold {dtype}{list(shape)} with byte "
                                   f"strides {strides}: {exc}") from None


def host_bytes(value: np.ndarray, strides: list[int] | None) -> bytes:
    """An array's bytes as the client asked for them (dense row-major, or with `strides`)."""
    if strides is None or value.size == 0:
        return np.ascontiguousarray(value).tobytes()
    if len(strides) != value.ndim:
        raise InvalidArgumentError(f"{len(strides)} byte strides for a rank-{value.ndim} array")
    span = value.dtype.itemsize + sum((n - 1) * abs(s) for n, s in zip(value.shape, strides))
    offset = sum((n - 1) * -s for n, s in zip(value.shape, strides) if s < 0)
    buffer = bytearray(span)
    np.ndarray(value.shape, value.dtype, buffer=buffer, offset=offset, strides=strides)[...] = value
    return bytes(buffer)


def _strides(message) -> list[int] | None:
    return list(message.byte_strides.strides) if message.HasField("byte_strides") else None


@handles("make_array_from_host_buffer_request",
         lambda r: [r.array_handle] if r.array_handle else [])
def make_array_from_host_buffer(session: Session, request: ifrt.MakeArrayFromHostBufferRequest
                                ) -> ifrt.MakeArrayFromHostBufferResponse:
    """Puts a whole array (one host buffer) onto the devices of its sharding."""
    dtype, shape = numpy_dtype(request.dtype), tuple(request.shape.dims)
    layout = parse_sharding(request.sharding, len(shape))
    value = host_array(session.host_buffers.take(request.host_buffer_handle), dtype, shape,
                       _strides(request))
    handle = _handle(session, request.array_handle)
    session.arrays[handle] = ProxyArray(dtype, shape, layout, put(session, value, layout))
    return ifrt.MakeArrayFromHostBufferResponse(array_handle=handle)


@handles("make_arrays_from_host_buffer_shards_request", lambda r: list(r.array_handles))
def make_arrays_from_host_buffer_shards(
        session: Session, request: ifrt.MakeArraysFromHostBufferShardsRequest
) -> ifrt.MakeArraysFromHostBufferShardsResponse:
    """Puts arrays whose blocks come in separate host buffers (what jax.device_put sends)."""
    if request.array_handles and len(request.array_handles) != len(request.specs):
        raise InvalidArgumentError(f"{len(request.array_handles)} handles for "
                                   f"{len(request.specs)} arrays")
    made = []
    for spec in request.specs:
        dtype, shape = numpy_dtype(spec.array_spec.dtype), tuple(spec.array_spec.shape.dims)
        layout = parse_sharding(spec.array_spec.sharding, len(shape))
        indices = layout.indices(shape)
        if len(spec.addressable_shard_indices) != len(spec.host_buffers):
            raise InvalidArgumentError("one list of shard indices per host buffer is needed")
        value = np.empty(shape, dtype)
        filled = set()
        for positions, buffer in zip(spec.addressable_shard_indices, spec.host_buffers):
            data = host_array(session.host_buffers.take(buffer.host_buffer_handle),
                              numpy_dtype(buffer.dtype), tuple(buffer.shape.dims),
                              _strides(buffer))
            for position in positions.indices:
                if not 0 <= position < len(indices):
                    raise InvalidArgumentError(f"shard {position} of a sharding over "
                                               f"{len(indices)} devices")
                block = _wire.as_slices(indices[position])
                if value[block].shape != data.shape:
                    raise InvalidArgumentError(f"host buffer of shape {data.shape} for block "
                                               f"{indices[position]}")
                value[block] = data
                filled.add(indices[position])
        if filled != set(indices):
            raise InvalidArgumentError("the host buffers do not cover every block of the array")
        made.append(ProxyArray(dtype, shape, layout, put(session, value, layout)))
    handles = [_handle(session, h) for h in request.array_handles] or [
        session.new_handle() for _ in made]
    for handle, array in zip(handles, made):
        session.arrays[handle] = array
    return ifrt.MakeArraysFromHostBufferShardsResponse(array_handles=handles)


@handles("make_error_arrays_request", lambda r: list(r.array_handles))
def make_error_arrays(session: Session, request: ifrt.MakeErrorArraysRequest
                      ) -> ifrt.MakeErrorArraysResponse:
    """Arrays whose every use fails with the client's error."""
    error = error_of(request.error)
    handles = list(request.array_handles) or [session.new_handle() for _ in request.array_specs]
    for handle in handles:
        session.arrays[handle] = ProxyArray.failed(error)
    return ifrt.MakeErrorArraysResponse(array_handles=handles)


@handles("assemble_array_from_single_device_arrays_request",
         lambda r: [r.result_handle] if r.result_handle else [])
def assemble(session: Session, request: ifrt.AssembleArrayFromSingleDeviceArraysRequest
             ) -> ifrt.AssembleArrayFromSingleDeviceArraysResponse:
    """One array from one single-device array per device. Blocks of one runtime array that
    already lies this way are that array again; anything else is read and put anew."""
    shape = tuple(request.shape.dims)
    layout = parse_sharding(request.sharding, len(shape))
    parts = [find(session, h) for h in request.single_device_array_handles]
    if len(parts) != len(layout.devices):
        raise InvalidArgumentError(f"{len(parts)} single-device arrays for a sharding over "
                                   f"{len(layout.devices)} devices")
    dtype = numpy_dtype(request.dtype) if request.HasField("dtype") else parts[0].dtype
    remote = _reassembled(parts, layout, shape)
    if remote is None:
        value = np.empty(shape, dtype)
        for part, index in zip(parts, layout.indices(shape)):
            value[_wire.as_slices(index)] = read(session, part)
        remote = put(session, value, layout)
    if request.copy_semantics == DONATE:
        for part in parts:
            part.delete()
    handle = _handle(session, request.result_handle)
    session.arrays[handle] = ProxyArray(dtype, shape, layout, remote)
    return ifrt.AssembleArrayFromSingleDeviceArraysResponse(array_handle=handle)


def _reassembled(parts: list[ProxyArray], layout: Layout, shape: tuple[int, ...]):
    """The runtime array `parts` were disassembled from, if they are its blocks in this layout."""
    parents = {id(p.block_of[0]) for p in parts if p.block_of is not None}
    if len(parents) != 1 or any(p.block_of is None for p in parts):
        return None
    parent = parts[0].block_of[0]
    if parent.shape != shape or [p.block_of[1] for p in parts] != layout.indices(shape):
        return None
    return parent if all(p.layout.devices[0] == d for p, d in zip(parts, layout.devices)) \
        else None


def _copy(session: Session, array: ProxyArray, layout: Layout, semantics: int) -> ProxyArray:
    """A copy of `array` laid out as `layout` (other devices, islands, or sharding): the hosts
    stream it to each other; no copy at all when it already lies so."""
    remote = remote_of(session, array)
    placement = place([layout], "the array")
    vslice = slice_for(session, placement)
    spec = placement.specs[0]
    if remote.slice.slice_id != vslice.slice_id or _wire.sharding_dims(
            _wire.spec_to_proto(0, remote.spec)) != _wire.sharding_dims(
            _wire.spec_to_proto(0, spec)):
        remote = session.client.transfer(remote, vslice, spec)
    if semantics == DONATE:
        array.delete()
    return ProxyArray(array.dtype, array.shape, layout, remote)


@handles("copy_arrays_request", lambda r: list(r.result_handles))
def copy_arrays(session: Session, request: ifrt.CopyArraysRequest) -> ifrt.CopyArraysResponse:
    """Copies arrays onto other devices, block for block (host to host, across islands too)."""
    if request.HasField("memory_kind") and request.memory_kind not in ("", MEMORY_KIND):
        raise UnimplementedError(f"memory kind {request.memory_kind!r} is not supported by the "
                                 f"proxy (only {MEMORY_KIND!r})")
    arrays = [find(session, h) for h in request.array_handles]
    copies = []
    for array in arrays:
        layout = (array.layout.with_devices(list(request.device_ids)) if request.device_ids
                  else array.layout)
        copies.append(_copy(session, array, layout, request.copy_semantics))
    return ifrt.CopyArraysResponse(array_handles=_store(session, request.result_handles, copies))


@handles("reshard_arrays_request", lambda r: list(r.result_handles))
def reshard_arrays(session: Session, request: ifrt.ReshardArraysRequest
                   ) -> ifrt.ReshardArraysResponse:
    """Copies arrays to new shardings (on any devices)."""
    if len(request.array_specs) != len(request.array_handles):
        raise InvalidArgumentError("one array spec per array is needed")
    copies = []
    for handle, spec in zip(request.array_handles, request.array_specs):
        array = find(session, handle)
        if tuple(spec.shape.dims) != array.shape or numpy_dtype(spec.dtype) != array.dtype:
            raise InvalidArgumentError("resharding cannot change an array's shape or dtype")
        layout = parse_sharding(spec.sharding, len(array.shape))
        copies.append(_copy(session, array, layout, request.copy_semantics))
    return ifrt.ReshardArraysResponse(array_handles=_store(session, request.result_handles,
                                                           copies))


def _store(session: Session, given, arrays: list[ProxyArray]) -> list[int]:
    handles = [_handle(session, h) for h in given] or [session.new_handle() for _ in arrays]
    for handle, array in zip(handles, arrays):
        session.arrays[handle] = array
    return handles


def _block(array: ProxyArray, position: int, index) -> ProxyArray:
    """The single-device array of one device position (a block of `array`)."""
    layout = Layout.replicated([array.layout.devices[position]], len(array.shape))
    if len(array.layout.devices) == 1:
        return ProxyArray(array.dtype, array.shape, layout, array.remote, array.block_of)
    shape = _wire.shard_shape(index)
    return ProxyArray(array.dtype, shape, layout, block_of=(array.remote, index))


@handles("disassemble_into_single_device_arrays_request", lambda r: list(r.result_handles))
def disassemble(session: Session, request: ifrt.DisassembleIntoSingleDeviceArraysRequest
                ) -> ifrt.DisassembleIntoSingleDeviceArraysResponse:
    """One single-device array per device of the array's sharding, in its order. They are read
    from the array's hosts when used; nothing moves now."""
    array = find(session, request.array_handle)
    indices = array.layout.indices(array.shape)
    parts = [_block(array, p, index) for p, index in enumerate(indices)]
    if request.copy_semantics == DONATE:
        array.delete()
    return ifrt.DisassembleIntoSingleDeviceArraysResponse(
        array_handles=_store(session, request.result_handles, parts))


@handles("fully_replicated_shard_request", lambda r: [r.result_handle] if r.result_handle else [])
def fully_replicated_shard(session: Session, request: ifrt.FullyReplicatedShardRequest
                           ) -> ifrt.FullyReplicatedShardResponse:
    """The copy of a replicated array on the first device of its sharding."""
    array = find(session, request.array_handle)
    if not array.layout.fully_replicated:
        raise InvalidArgumentError("the array is not fully replicated")
    part = _block(array, 0, tuple((0, n) for n in array.shape))
    if request.copy_semantics == DONATE:
        array.delete()
    (handle,) = _store(session, [request.result_handle] if request.result_handle else [], [part])
    return ifrt.FullyReplicatedShardResponse(array_handle=handle)


@handles("copy_to_host_buffer_request")
def copy_to_host_buffer(session: Session, request: ifrt.CopyToHostBufferRequest) -> Later:
    """Reads an array (once computed) into a host buffer the client then looks up."""
    array = find(session, request.array_handle)
    strides = _strides(request)

    def copy() -> ifrt.CopyToHostBufferResponse:
        session.host_buffers.store(request.host_buffer_handle,
                                   host_bytes(read(session, array), strides))
        return ifrt.CopyToHostBufferResponse()
    return Later(copy)


@handles("check_value_ready_request")
def check_value_ready(session: Session, request: ifrt.CheckValueReadyRequest) -> Later:
    """Answers once every array is computed, or with its producer's failure."""
    arrays = [find(session, h) for h in request.value_handles]

    def wait() -> ifrt.CheckValueReadyResponse:
        wait_ready(session, arrays)
        return ifrt.CheckValueReadyResponse()
    return Later(wait)


@handles("delete_array_request")
def delete_arrays(session: Session, request: ifrt.DeleteArrayRequest) -> ifrt.DeleteArrayResponse:
    """Drops the arrays' data; the future fails for handles that are unknown."""
    unknown = [h for h in request.array_handle if h not in session.arrays]
    for handle in request.array_handle:
        if handle in session.arrays:
            session.arrays[handle].delete()

    def outcome() -> None:
        if unknown:
            raise ArrayNotFoundError(f"array handles {unknown} are unknown")
    return ifrt.DeleteArrayResponse(deletion_future_handle=session.add_future(outcome))


@handles("is_array_deleted_request")
def is_array_deleted(session: Session, request: ifrt.IsArrayDeletedRequest
                     ) -> ifrt.IsArrayDeletedResponse:
    array = session.arrays.get(request.array_handle)
    if array is None:
        raise ArrayNotFoundError(f"array handle {request.array_handle} is unknown")
    deleted = array.deleted or (array.remote is not None and array.remote.is_deleted())
    return ifrt.IsArrayDeletedResponse(deleted=deleted)


@handles("destruct_array_request")
def destruct_arrays(session: Session, request: ifrt.DestructArrayRequest
                    ) -> ifrt.DestructArrayResponse:
    """Forgets handles (their data goes once no other array shares it)."""
    for handle in request.array_handle:
        session.arrays.pop(handle, None)
    return ifrt.DestructArrayResponse()
