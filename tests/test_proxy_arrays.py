"""Array requests of the IFRT proxy, message by message: host buffers in and out (dense and
strided), sharded puts, disassembly and assembly, copies between islands, deletion, errors."""

import grpc
import numpy as np

from proto.ifrt import ifrt_arrays_pb2 as ifrt
from proto.ifrt import ifrt_service_pb2
from proto.ifrt import status_pb2, types_pb2, xla_pb2
from runtime.proxy._array_requests import host_array, host_bytes

F32 = types_pb2.DTypeProto(kind=types_pb2.DTypeProto.KIND_F32)
CODE = {c.value[0]: c for c in grpc.StatusCode}


def tiled(devices, dims, rank):
    """An HloSharding proto: iota tiles `dims` over `devices` (last dim replicated if extra)."""
    op = xla_pb2.OpSharding(type=xla_pb2.OpSharding.OTHER, tile_assignment_dimensions=dims,
                            iota_reshape_dims=[len(devices)], iota_transpose_perm=[0],
                            replicate_on_last_tile_dim=len(dims) > rank)
    return types_pb2.ShardingProto(
        serialized_sharding=types_pb2.Serialized(
            type_name="xla::ifrt::HloSharding", data=types_pb2.HloShardingProto(
                devices=types_pb2.DeviceListProto(device_ids=devices), memory_kind="device",
                xla_op_sharding=op).SerializeToString()))


def status(response):
    return CODE[response.response_metadata.status.code]


def make(wire, value, sharding, handle, buffer=None, strides=None):
    wire.store(buffer or handle + 1000, host_bytes(value, strides))
    request = ifrt.MakeArrayFromHostBufferRequest(
        dtype=F32, shape=types_pb2.ShapeProto(dims=value.shape), sharding=sharding,
        host_buffer_handle=buffer or handle + 1000, array_handle=handle)
    if strides is not None:
        request.byte_strides.strides[:] = strides
    return wire.call("make_array_from_host_buffer_request", request)


def fetch(wire, handle, buffer, dtype=np.float32, shape=None, strides=None):
    request = ifrt.CopyToHostBufferRequest(array_handle=handle, host_buffer_handle=buffer)
    if strides is not None:
        request.byte_strides.strides[:] = strides
    response = wire.call("copy_to_host_buffer_request", request)
    assert status(response) == grpc.StatusCode.OK, response
    data = wire.lookup(buffer)
    return host_array(data, np.dtype(dtype), shape, strides)


def test_strided_host_buffers_convert_both_ways():
    value = np.arange(24, dtype=np.float32).reshape(4, 6)
    for strides in (None, [24, 4], [4, 16], [-24, 4]):
        data = host_bytes(value, strides)
        np.testing.assert_array_equal(host_array(data, value.dtype, value.shape, strides), value)
    assert len(host_bytes(value, [4, 16])) == 4 + 3 * 4 + 5 * 16  # the smallest region


def test_sharded_put_and_read_back(wire):
    value = np.arange(64, dtype=np.float32).reshape(8, 8)
    assert status(make(wire, value, tiled([0, 1, 2, 3], [2, 2], 2), 1)) == grpc.StatusCode.OK
    np.testing.assert_array_equal(fetch(wire, 1, 500, shape=(8, 8)), value)
    transposed = fetch(wire, 1, 501, shape=(8, 8), strides=[4, 32])
    np.testing.assert_array_equal(transposed, value)
    ready = wire.call("check_value_ready_request", ifrt.CheckValueReadyRequest(value_handles=[1]))
    assert ready.HasField("check_value_ready_response")


def test_blocks_come_from_disassembly_and_reassemble_without_copies(wire, proxy):
    value = np.arange(32, dtype=np.float32).reshape(8, 4)
    make(wire, value, tiled([4, 5, 6, 7], [4, 1, 1], 2), 10)
    response = wire.call("disassemble_into_single_device_arrays_request",
                         ifrt.DisassembleIntoSingleDeviceArraysRequest(
                             array_handle=10, result_handles=[11, 12, 13, 14]))
    assert list(response.disassemble_into_single_device_arrays_response.array_handles) == [
        11, 12, 13, 14]
    np.testing.assert_array_equal(fetch(wire, 13, 600, shape=(2, 4)), value[4:6])
    response = wire.call("assemble_array_from_single_device_arrays_request",
                         ifrt.AssembleArrayFromSingleDeviceArraysRequest(
                             shape=types_pb2.ShapeProto(dims=[8, 4]),
                             sharding=tiled([4, 5, 6, 7], [4, 1, 1], 2), dtype=F32,
                             single_device_array_handles=[11, 12, 13, 14], result_handle=15))
    assert status(response) == grpc.StatusCode.OK
    session = proxy.proxy.session(wire.session_id)
    assert session.arrays[15].remote is session.arrays[10].remote  # the same runtime array
    np.testing.assert_array_equal(fetch(wire, 15, 601, shape=(8, 4)), value)


def test_copies_move_arrays_between_islands(wire, proxy):
    value = np.arange(16, dtype=np.float32).reshape(4, 4)
    make(wire, value, tiled([0, 1], [2, 1], 2), 20)
    response = wire.call("copy_arrays_request", ifrt.CopyArraysRequest(
        array_handles=[20], device_ids=[6, 5], result_handles=[21]))
    assert status(response) == grpc.StatusCode.OK
    copy = proxy.proxy.session(wire.session_id).arrays[21]
    assert copy.remote.slice.island == 1
    np.testing.assert_array_equal(fetch(wire, 21, 700, shape=(4, 4)), value)
    response = wire.call("reshard_arrays_request", ifrt.ReshardArraysRequest(
        array_handles=[21], result_handles=[22], array_specs=[types_pb2.ArraySpecProto(
            dtype=F32, shape=types_pb2.ShapeProto(dims=[4, 4]),
            sharding=tiled([3, 2, 1, 0], [1, 4], 2))]))
    assert status(response) == grpc.StatusCode.OK
    np.testing.assert_array_equal(fetch(wire, 22, 701, shape=(4, 4)), value)


def test_deleted_and_failed_arrays_raise_on_use(wire):
    make(wire, np.ones(4, np.float32), tiled([0], [1], 1), 30)
    response = wire.call("delete_array_request", ifrt.DeleteArrayRequest(array_handle=[30]))
    future = response.delete_array_response.deletion_future_handle
    assert future >= 1 << 48
    assert wire.call("check_future_request", ifrt_service_pb2.CheckFutureRequest(future_handle=future)
                     ).HasField("check_future_response")
    deleted = wire.call("is_array_deleted_request", ifrt.IsArrayDeletedRequest(array_handle=30))
    assert deleted.is_array_deleted_response.deleted
    assert status(wire.call("copy_to_host_buffer_request", ifrt.CopyToHostBufferRequest(
        array_handle=30, host_buffer_handle=800))) == grpc.StatusCode.NOT_FOUND
    wire.call("make_error_arrays_request", ifrt.MakeErrorArraysRequest(
        error=status_pb2.StatusProto(code=3, message="bad input upstream"), array_handles=[31]))
    response = wire.call("check_value_ready_request", ifrt.CheckValueReadyRequest(
        value_handles=[31]))
    assert status(response) == grpc.StatusCode.INVALID_ARGUMENT
    assert "bad input upstream" in response.response_metadata.status.message


def test_a_failed_request_fails_the_arrays_it_was_to_make(wire):
    wide = types_pb2.DTypeProto(kind=types_pb2.DTypeProto.KIND_F64)
    wire.store(901, bytes(32))
    response = wire.call("make_array_from_host_buffer_request", ifrt.MakeArrayFromHostBufferRequest(
        dtype=wide, shape=types_pb2.ShapeProto(dims=[4]), sharding=tiled([0], [1], 1),
        host_buffer_handle=901, array_handle=40))
    assert status(response) == grpc.StatusCode.UNIMPLEMENTED
    assert "64-bit" in response.response_metadata.status.message
    later = wire.call("copy_to_host_buffer_request", ifrt.CopyToHostBufferRequest(
        array_handle=40, host_buffer_handle=902))
    assert status(later) == grpc.StatusCode.UNIMPLEMENTED


def test_shardings_the_runtime_cannot_hold_are_named(wire):
    opaque = types_pb2.ShardingProto(serialized_sharding=types_pb2.Serialized(
        type_name="xla::ifrt::OpaqueSharding"))
    response = make(wire, np.ones(4, np.float32), opaque, 50)
    assert status(response) == grpc.StatusCode.UNIMPLEMENTED
    assert "OpaqueSharding" in response.response_metadata.status.message
    spanning = make(wire, np.ones(4, np.float32), tiled([3, 4], [2], 1), 51)
    assert status(spanning) == grpc.StatusCode.INVALID_ARGUMENT
    assert "islands 0, 1" in spanning.response_metadata.status.message
    uneven = make(wire, np.ones(5, np.float32), tiled([0, 1], [2], 1), 52)
    assert "does not split" in uneven.response_metadata.status.message
