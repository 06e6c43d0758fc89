"""Every documented error raises its exception, on the wire with its status code, and the cluster
keeps serving afterwards."""

import time

import grpc
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import runtime
import runtime.server
from proto import pathways_pb2 as pb
from proto.errors import ArrayNotFoundError, ExecutionError, HostLostError


def still_works(client, island=0):
    s = client.slice({"d": 2}, island=island)
    out = client.jit(lambda v: v * 3, s)(client.put(np.arange(4, dtype=np.int32), s))
    np.testing.assert_array_equal(out.fetch(timeout=30), np.arange(4) * 3)


@pytest.fixture
def add(client):
    s = client.slice({"d": 4}, island=0)
    return s, client.jit(lambda a, b: a + b, s).lower(
        jax.ShapeDtypeStruct((8,), np.float32), jax.ShapeDtypeStruct((8,), np.float32))


def test_wrong_shape_or_dtype_for_compiled_function(client, add):
    s, f = add
    ok = client.put(np.ones(8, np.float32), s)
    with pytest.raises(runtime.InvalidArgumentError, match=r"float32\[4\].*compiled for float32\[8\]"):
        f(ok, client.put(np.ones(4, np.float32), s))
    with pytest.raises(runtime.InvalidArgumentError, match=r"int32\[8\]"):
        f(ok, client.put(np.ones(8, np.int32), s))
    with pytest.raises(runtime.InvalidArgumentError, match="structure"):
        f(ok)
    np.testing.assert_array_equal(f(ok, ok).fetch(), np.full(8, 2, np.float32))
    still_works(client)


def test_server_rejects_wrong_input_with_invalid_argument(client, add):
    """A client that skips the local checks still gets INVALID_ARGUMENT from the controller, for
    that command only: the commands around it are ordered."""
    s, f = add
    wrong, right = client.put(np.ones(8, np.int32), s), client.put(np.ones(8, np.float32), s)
    bad = pb.Call(executable_id=f.executable_id, inputs=[wrong.id, wrong.id],
                  outputs=[client._new_id()])
    good = pb.Call(executable_id=f.executable_id, inputs=[right.id, right.id],
                   outputs=[client._new_id()])
    reply = client.controller_stub.Execute(pb.ExecuteRequest(  # the client's own channel: token, session key
        session_id=client.session_id, commands=[pb.Command(call=bad), pb.Command(call=good)]),
        timeout=10)
    rejected, accepted = reply.results
    assert rejected.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert rejected.error == "InvalidArgumentError" and "expected float32[8]" in rejected.message
    assert not accepted.error and accepted.sequence[0] > 0
    got = runtime.RemoteArray(client, good.outputs[0], (8,), np.float32, P(), s, accepted.sequence[0])
    np.testing.assert_array_equal(got.fetch(), np.full(8, 2, np.float32))
    still_works(client)


def test_deleted_and_unknown_array_handles(client, add):
    s, f = add
    x = client.put(np.ones(8, np.float32), s)
    x.delete()
    with pytest.raises(runtime.ArrayNotFoundError, match="deleted"):
        f(x, x)
    with pytest.raises(runtime.ArrayNotFoundError):
        x.fetch()
    with pytest.raises(runtime.ArrayNotFoundError):
        x.delete()
    forged = runtime.RemoteArray(client, client._new_id(), (8,), np.float32, P(), s)
    out = f(forged, forged)  # returns at once: the controller's rejection arrives asynchronously
    with pytest.raises(runtime.ArrayNotFoundError, match="unknown"):
        out.fetch()
    with pytest.raises(runtime.ArrayNotFoundError, match="unknown"):
        client.sync()
    client.sync()  # each rejection is reported by sync once
    with pytest.raises(grpc.RpcError) as info:
        client.controller_stub.DeleteArrays(pb.DeleteArraysRequest(session_id=client.session_id,
                                                         array_ids=[forged.id]), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    forged._mark_consumed()
    still_works(client)


def test_another_sessions_arrays_are_not_usable(cluster, client, add):
    s, f = add
    other = cluster.client("other")
    try:
        theirs = other.put(np.ones(8, np.float32), other.slice({"d": 4}, island=0))
        stolen = runtime.RemoteArray(client, theirs.id, (8,), np.float32, P(), s)
        with pytest.raises(runtime.ArrayNotFoundError):
            f(stolen, stolen).fetch()
        stolen._mark_consumed()
    finally:
        other.close()


def test_slice_larger_than_its_island(client):
    with pytest.raises(runtime.SliceUnavailableError, match="needs 8 devices"):
        client.slice((4, 2), ("x", "y"), island=0)
    with pytest.raises(runtime.SliceUnavailableError, match="needs 16 devices"):
        client.slice({"d": 16})
    with pytest.raises(runtime.SliceUnavailableError, match="island 7 does not exist"):
        client.slice({"d": 1}, island=7)
    with pytest.raises(runtime.InvalidArgumentError):
        client.slice((2, 0), ("x", "y"))
    with pytest.raises(runtime.InvalidArgumentError):
        client.slice((2, 2), ("x", "x"))
    still_works(client)


def test_bad_sharding_is_rejected(client):
    s = client.slice({"d": 4}, island=0)
    with pytest.raises(runtime.InvalidArgumentError, match="does not split"):
        client.put(np.ones(6, np.float32), s, P("d"))
    with pytest.raises(runtime.InvalidArgumentError, match="axis 'z'"):
        client.put(np.ones(8, np.float32), s, P("z"))
    still_works(client)


def test_function_that_cannot_be_exported(client):
    s = client.slice({"d": 2}, island=1)
    f = client.jit(lambda v: jax.debug.callback(print, v) or v, s)
    with pytest.raises(runtime.InvalidArgumentError, match="host callback.*cannot run on the "
                                                           "islands' hosts"):
        f(client.put(np.ones(2, np.float32), s))
    still_works(client, island=1)


def test_garbage_executable_gets_invalid_argument(client):
    s = client.slice({"d": 2}, island=0)
    spec = pb.ValueSpec(dtype="float32", shape=[2])
    with pytest.raises(runtime.InvalidArgumentError, match="not a serialized jax.export"):
        client.call("LoadExecutable", pb.LoadExecutableRequest(
            session_id=client.session_id, slice_id=s.slice_id, serialized=b"\x00garbage",
            inputs=[spec], outputs=[spec], name="garbage"))
    still_works(client)


def test_worker_reports_a_load_failure_on_the_outputs():
    """A host that cannot compile a module fails the calls' outputs with a clear error."""
    worker = runtime.server.Worker(0, 0, jax.devices()[:2])
    try:
        info = pb.SliceInfo(slice_id=1, mesh_shape=[2], axis_names=["d"],
                            devices=[pb.SliceDevice(host=0, device=i) for i in range(2)])
        spec = pb.ValueSpec(dtype="float32", shape=[2])
        worker.receive("c", [
            pb.Instruction(sequence=1, define_slice=pb.DefineSliceInstruction(slice=info)),
            pb.Instruction(sequence=2, load=pb.LoadInstruction(
                executable_id=1, slice_id=1, serialized=b"junk", name="junk", inputs=[spec],
                outputs=[spec], fingerprint=__import__("hashlib").sha256(b"junk").hexdigest())),
            pb.Instruction(sequence=3, execute=pb.ExecuteInstruction(
                executable_id=1, inputs=[], outputs=[7]))])
        with pytest.raises(runtime.InvalidArgumentError, match="junk.*not a serialized"):
            worker.store.get(7, timeout=30)
    finally:
        worker.stop()


def test_input_that_never_arrives_fails_within_its_deadline():
    """A computation on a declared array that is never put waits in its client's queue (not in
    the island's order) and fails at its request's deadline."""
    with runtime.LocalCluster(islands=1, devices_per_island=2, input_timeout_s=0.5) as cluster:
        client = runtime.Client(cluster.address, timeout_s=5.0, credentials=cluster.credentials)
        s = client.slice({"d": 2})
        never = pb.ArraySpec(array_id=client._new_id(), dtype="float32", shape=[2],
                             sharding=pb.Sharding(slice_id=s.slice_id))
        client.call("RegisterArrays", pb.RegisterArraysRequest(session_id=client.session_id,
                                                               arrays=[never]))
        handle = runtime.RemoteArray(client, never.array_id, (2,), np.float32, P(), s)
        out = client.jit(lambda v: v + 1, s)(handle)
        with pytest.raises(runtime.DeadlineExceededError, match="does not exist yet"):
            out.fetch(timeout=30)
        still_works(client)
        client.close()


def test_controller_that_is_not_there():
    start = time.monotonic()
    with pytest.raises(runtime.ControllerUnavailableError, match="no controller"):
        runtime.Client("127.0.0.1:1", timeout_s=2.0)
    assert time.monotonic() - start < 10


def test_host_that_went_away():
    """A lost host fails work on its island with HostLostError; the other island keeps working."""
    with runtime.LocalCluster(islands=2, devices_per_island=2) as cluster:
        client = cluster.client()
        s0, s1 = client.slice({"d": 2}, island=0), client.slice({"d": 2}, island=1)
        f1 = client.jit(lambda v: v + 1, s1)
        x1 = f1(client.put(np.zeros(2, np.float32), s1))
        np.testing.assert_array_equal(x1.fetch(), [1, 1])
        cluster.kill_worker(1)
        with pytest.raises(runtime.HostLostError, match="1.0"):
            x1.fetch(timeout=5)
        deadline = time.monotonic() + 5
        with pytest.raises(runtime.HostLostError, match="host 1.0"):
            while time.monotonic() < deadline:  # the heartbeat notices within ~1 s
                f1(x1)
                client.sync()
                time.sleep(0.1)
        with pytest.raises(runtime.HostLostError):
            client.slice({"d": 2}, island=1)
        f0 = client.jit(lambda v: v * 2, s0)
        np.testing.assert_array_equal(f0(client.put(np.ones(2, np.float32), s0)).fetch(), [2, 2])
        assert "lost" in {h.island: h.state for h in client.status().hosts}[1]


def test_client_side_translation_names_the_peer_and_keeps_the_servers_error():
    """One translator (proto.errors.translate_rpc_error) for every client-side caller: the
    server's own exception when it sent one, else a deadline or the peer's loss; all carry the
    peer as their origin."""
    import grpc

    from proto.errors import (ERROR_KEY, ControllerUnavailableError, DeadlineExceededError,
                              NotFoundError, translate_rpc_error)

    class Failed(grpc.RpcError):
        def __init__(self, code, details, metadata=()):
            self._code, self._details, self._metadata = code, details, metadata

        def code(self):
            return self._code

        def details(self):
            return self._details

        def trailing_metadata(self):
            return self._metadata

    sent = translate_rpc_error(Failed(grpc.StatusCode.NOT_FOUND, "slice 3 is unknown",
                                      ((ERROR_KEY, "NotFoundError"),)),
                               "controller a:1", "ReleaseSlice", ControllerUnavailableError)
    assert type(sent) is NotFoundError and str(sent) == "slice 3 is unknown"
    assert sent.origin == "controller a:1"
    late = translate_rpc_error(Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "late"), "host 0.1 (b:2)",
                               "GetArray", HostLostError)
    assert isinstance(late, DeadlineExceededError) and "host 0.1 (b:2)" in str(late)
    gone = translate_rpc_error(Failed(grpc.StatusCode.UNAVAILABLE, "refused"), "host 0.1 (b:2)",
                               "GetArray", HostLostError)
    assert isinstance(gone, HostLostError) and gone.origin == "host 0.1 (b:2)"


def test_store_errors_carry_their_origin():
    """The store's own errors (about the wait) say so; a producer's stored error does not."""
    from proto.errors import STORE
    from runtime.worker.store import ArrayStore

    store = ArrayStore()
    with pytest.raises(ArrayNotFoundError) as missing:
        store.get(7, 0.0)
    assert missing.value.origin == STORE
    store.expect(8)
    store.fail(8, ExecutionError("step failed"))
    with pytest.raises(ExecutionError) as failed:
        store.get(8, 0.0)
    assert failed.value.origin == ""
