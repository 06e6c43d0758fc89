"""Client isolation: a session's arrays, executables and slices are its own. Another client (which
holds the cluster token, as every client does) can neither read, use, overwrite nor delete them, nor
act as that session, nor reset a host; a per-session memory quota stops one client alone."""

from __future__ import annotations

import grpc
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import runtime
from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import rpc as _rpc
from proto import wire as _wire


@pytest.fixture
def victim(cluster):
    """A session with a stored array, a computed one and an executable on island 0."""
    client = cluster.client("victim")
    s = client.slice({"d": 2}, island=0)
    data = np.arange(8, dtype=np.float32)
    x = client.put(data, s, P("d"))
    f = client.jit(lambda v: v + 1, s, in_specs=P("d"), out_specs=P("d"))
    y = f(x)
    np.testing.assert_array_equal(y.fetch(), data + 1)
    yield client, s, x, y, f.lower(x), data
    client.close()


def _intact(victim) -> None:
    client, s, x, y, compiled, data = victim
    np.testing.assert_array_equal(x.fetch(), data)
    np.testing.assert_array_equal(y.fetch(), data + 1)
    np.testing.assert_array_equal(compiled(x).fetch(), data + 1)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


DENIED = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)


def test_acting_as_another_session_is_denied(cluster, victim):
    client, s, x, y, compiled, _ = victim
    attacker = cluster.client("attacker")
    try:
        stub = attacker.controller_stub  # carries the attacker's token and session key
        sid = client.session_id
        calls = {
            "Execute": pb.ExecuteRequest(session_id=sid, commands=[pb.Command(
                delete=pb.DeleteCommand(array_ids=[x.id, y.id]))]),
            "DeleteArrays": pb.DeleteArraysRequest(session_id=sid, array_ids=[x.id]),
            "ReleaseSlice": pb.ReleaseSliceRequest(session_id=sid, slice_id=s.slice_id),
            "Disconnect": pb.DisconnectRequest(session_id=sid),
            "CreateSlice": pb.CreateSliceRequest(session_id=sid, mesh_shape=[1],
                                                 axis_names=["d"], island=0),
            "RegisterArrays": pb.RegisterArraysRequest(session_id=sid, arrays=[pb.ArraySpec(
                array_id=x.id, dtype="float32", shape=[8],
                sharding=pb.Sharding(slice_id=s.slice_id))]),
        }
        for method, request in calls.items():
            code = _code(lambda: getattr(stub, method)(request, timeout=10))
            assert code == grpc.StatusCode.PERMISSION_DENIED, method
        # Its own session naming the victim's things: they do not exist for it.
        mine = attacker.session_id
        assert _code(lambda: stub.DeleteArrays(pb.DeleteArraysRequest(
            session_id=mine, array_ids=[x.id]), timeout=10)) in DENIED
        assert _code(lambda: stub.ReleaseSlice(pb.ReleaseSliceRequest(
            session_id=mine, slice_id=s.slice_id), timeout=10)) in DENIED
        reply = stub.Execute(pb.ExecuteRequest(session_id=mine, commands=[
            pb.Command(call=pb.Call(executable_id=compiled.executable_id, inputs=[x.id],
                                    outputs=[attacker._new_id()])),
            pb.Command(delete=pb.DeleteCommand(array_ids=[x.id]))]), timeout=10)
        assert [r.error for r in reply.results][0] in ("NotFoundError", "ArrayNotFoundError")
        # A raw channel without a session key is denied too.
        with _rpc.open_channel(cluster.address, getattr(cluster, "credentials", None)) as ch:
            assert _code(lambda: pb_grpc.ControllerStub(ch).DeleteArrays(
                pb.DeleteArraysRequest(session_id=sid, array_ids=[x.id]), timeout=10)) \
                == grpc.StatusCode.PERMISSION_DENIED
    finally:
        attacker.close()
    _intact(victim)


def test_hosts_refuse_other_sessions_and_strangers(cluster, victim):
    client, s, x, y, compiled, data = victim
    attacker = cluster.client("attacker")
    try:
        worker = attacker.worker_stub(s.info.host_addresses[0])
        # Reading the victim's array.
        assert _code(lambda: list(worker.GetArray(pb.GetArrayRequest(
            array_id=x.id, timeout_s=1.0), timeout=5))) in DENIED
        # Overwriting it.
        spec = pb.ArraySpec(array_id=x.id, dtype="float32", shape=[8],
                            sharding=_wire.spec_to_proto(s.slice_id, P("d")))
        groups = _wire.shard_groups((8,), s.mesh_shape, spec.sharding)
        chunks = list(_wire.iter_chunks(spec, [(i, ps, np.zeros(4, np.float32))
                                               for i, ps in groups]))
        assert _code(lambda: worker.PutArray(iter(chunks), timeout=5)) in DENIED
        # Posing as a controller: a dispatch would reset the host.
        assert _code(lambda: worker.Dispatch(pb.DispatchRequest(
            controller_id="forged", instructions=[pb.Instruction(sequence=1, delete=pb.DeleteInstruction(
                array_ids=[x.id]))]), timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
        # Posing as a host: re-registering island 0's host elsewhere, or removing it.
        info = pb.HostInfo(island=0, host=0, address="127.0.0.1:1", num_devices=4)
        assert _code(lambda: attacker.controller_stub.RegisterHost(pb.RegisterHostRequest(host=info),
                                                         timeout=5)) in (
            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS)
        assert _code(lambda: attacker.controller_stub.UnregisterHost(pb.UnregisterHostRequest(
            island=0, host=0, address=s.info.host_addresses[0]), timeout=5)) \
            == grpc.StatusCode.PERMISSION_DENIED
    finally:
        attacker.close()
    _intact(victim)


def test_memory_quota_is_per_session():
    with runtime.LocalCluster(islands=1, devices_per_island=2, session_quota_bytes=4096) as c:
        greedy, modest = c.client("greedy"), c.client("modest")
        sg, sm = greedy.slice({"d": 2}), modest.slice({"d": 2})
        kept = greedy.put(np.ones(256, np.float32), sg, P("d"))  # 1 KiB
        with pytest.raises(runtime.ResourceExhaustedError, match="quota"):
            greedy.put(np.ones(2048, np.float32), sg, P("d"))  # 8 KiB
        grow = greedy.jit(lambda v: jax.numpy.tile(v, 8), sg, in_specs=P("d"), out_specs=P("d"))
        with pytest.raises(runtime.ResourceExhaustedError, match="quota"):
            grow(kept).fetch()
        # The other session is untouched by the greedy one's use.
        other = modest.put(np.ones(512, np.float32), sm, P("d"))  # 2 KiB
        np.testing.assert_array_equal(other.fetch(), np.ones(512, np.float32))
        np.testing.assert_array_equal(kept.fetch(), np.ones(256, np.float32))
        kept.delete()  # frees quota
        again = greedy.put(np.ones(768, np.float32), sg, P("d"))  # 3 KiB
        np.testing.assert_array_equal(again.fetch(), np.ones(768, np.float32))
