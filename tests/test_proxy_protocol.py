"""The IFRT proxy server, message by message (tests/proxy_wire.py speaks the protocol): version
negotiation, init, host buffers, authentication, requests it does not serve."""

import grpc
import pytest

from proto.ifrt import grpc_ifrt_service_pb2 as grpc_ifrt
from proto.ifrt import grpc_ifrt_service_pb2_grpc as ifrt_grpc
from proto.ifrt import ifrt_service_pb2 as ifrt
from runtime.proxy._server import PROTOCOL_VERSION
from proxy_wire import WireSession

UNIMPLEMENTED, NOT_FOUND = grpc.StatusCode.UNIMPLEMENTED.value[0], grpc.StatusCode.NOT_FOUND.value[0]


def test_version_is_negotiated_within_the_clients_range(proxy):
    stub = ifrt_grpc.GrpcIfrtServiceStub(grpc.insecure_channel(proxy.address))
    version = ifrt.IfrtProxyVersion
    reply = stub.GetVersion(grpc_ifrt.GrpcGetVersionRequest(
        min_version=version(protocol_version=16),
        max_version=version(protocol_version=25, ifrt_serdes_version_number=3)), timeout=10)
    assert reply.version.protocol_version == PROTOCOL_VERSION
    assert reply.version.ifrt_serdes_version_number == 3
    with pytest.raises(grpc.RpcError) as err:
        stub.GetVersion(grpc_ifrt.GrpcGetVersionRequest(min_version=version(protocol_version=3),
                                                   max_version=version(protocol_version=10)),
                        timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "25" in err.value.details()


def test_init_lists_every_islands_devices_with_their_hosts(wire, cluster):
    init = wire.call("init_request", ifrt.InitRequest()).init_response
    assert init.session_id == wire.session_id != 0
    assert init.platform_name == "cpu" and init.runtime_type == "pathways"
    devices = list(init.all_devices)
    assert [d.id for d in devices] == list(range(8))
    islands = [d.attributes.attributes["island"].int64_value for d in devices]
    assert islands == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [d.attributes.attributes["slice_index"].int64_value for d in devices] == islands
    assert [d.local_device_id for d in devices] == [0, 1, 2, 3] * 2
    assert list(init.addressable_device_ids) == list(init.primary_device_ids) == list(range(8))
    assert {m.memory_space_kind for m in init.memories} == {"device"}
    assert all(list(d.memory_ids) == [d.default_memory_id] for d in devices)


def test_host_buffers_round_trip_and_unknown_sessions_are_refused(wire, proxy):
    data = bytes(range(256)) * 1000
    wire.store(7, data)
    assert wire.lookup(7) == data
    with pytest.raises(grpc.RpcError) as err:
        wire.store(7, b"again")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stranger = WireSession(proxy.address, None)
    stranger.session_id = wire.session_id ^ 1
    with pytest.raises(grpc.RpcError) as err:
        stranger.lookup(7)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    stranger.channel.close()


def test_requests_it_does_not_serve_answer_unimplemented_naming_them(wire):
    for kind in ("remap_arrays_request", "loaded_host_callback_poll_request",
                 "bitcast_arrays_request"):
        response = wire.call(kind, b"")
        assert response.response_metadata.status.code == UNIMPLEMENTED
        assert kind in response.response_metadata.status.message
    # The session goes on serving.
    assert wire.call("init_request", ifrt.InitRequest()).HasField("init_response")


def test_unknown_futures_are_not_found(wire):
    response = wire.call("check_future_request", ifrt.CheckFutureRequest(future_handle=12345))
    assert response.response_metadata.status.code == NOT_FOUND


def test_a_session_without_the_token_is_refused(proxy):
    session = WireSession(proxy.address, "not-the-token")
    status = session.call("init_request", ifrt.InitRequest()).response_metadata.status
    assert status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert "cannot open a runtime session" in status.message
    session.close()


def test_a_request_whose_host_buffer_failed_to_arrive_fails_at_once(wire):
    from proto.ifrt import ifrt_arrays_pb2, types_pb2

    with pytest.raises(grpc.RpcError):  # announces 10 bytes, sends 3
        wire.stub.HostBufferStore(iter([grpc_ifrt.GrpcHostBufferStoreRequest(data=b"abc")]),
                                  timeout=10, metadata=[(
                                      "ifrt-proxy-grpc-host-buffer-store-metadata-bin",
                                      grpc_ifrt.GrpcHostBufferStoreMetadata(
                                          session_id=wire.session_id, handle=99,
                                          buffer_size=10).SerializeToString())])
    single = types_pb2.SingleDeviceShardingProto(device_id=0)
    response = wire.call("make_array_from_host_buffer_request",
                         ifrt_arrays_pb2.MakeArrayFromHostBufferRequest(
                             dtype=types_pb2.DTypeProto(kind=types_pb2.DTypeProto.KIND_U8),
                             shape=types_pb2.ShapeProto(dims=[10]), host_buffer_handle=99,
                             array_handle=5, sharding=types_pb2.ShardingProto(
                                 serialized_sharding=types_pb2.Serialized(
                                     type_name="xla::ifrt::SingleDeviceSharding",
                                     data=single.SerializeToString()))), timeout=30)
    status = response.response_metadata.status
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "was not stored" in status.message and "3 of 10 bytes" in status.message
