"""Hosts store only arrays the controller announced, as announced, once; and a session's arrays
leave its hosts when the session ends. Every byte on a host is one the controller accounts for.
After each hostile put a bystander's work and the cluster's status are unaffected."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from proto import pathways_pb2 as pb
from proto import auth as _auth
from runtime.worker import dataplane as _dataplane
from proto import wire as _wire


@pytest.fixture
def attacker(cluster):
    client = cluster.client("attacker")
    yield client
    client.close()


@pytest.fixture(autouse=True)
def short_announcement_wait(monkeypatch):
    """A put waits this long for its array's announcement before it is refused."""
    monkeypatch.setattr(_dataplane, "ANNOUNCE_TIMEOUT_S", 1.0)


def _chunks(spec: pb.ArraySpec, data: np.ndarray, positions=(0,)) -> list[pb.ArrayChunk]:
    index = tuple((0, d) for d in data.shape)
    return list(_wire.iter_chunks(spec, [(index, list(positions), data)]))


def _refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _owned_on_host(worker, session_id: int) -> list[int]:
    with worker.store._cond:
        return [a for a in worker.store._entries if a >> _auth.ID_BITS == session_id]


def test_puts_of_unannounced_arrays_are_refused(cluster, bystander, attacker):
    s = attacker.slice({"d": 1}, island=0)
    worker = cluster.workers[0]
    stub = attacker.worker_stub(s.info.host_addresses[0])
    before = worker.store.stats()
    data = np.ones((1 << 20,), np.float32)  # 4 MiB each, outside any quota if it were stored
    futures = [stub.PutArray.future(iter(_chunks(pb.ArraySpec(
        array_id=attacker._new_id(), dtype="float32", shape=data.shape,
        sharding=pb.Sharding(slice_id=s.slice_id)), data)), timeout=20) for _ in range(8)]
    for future in futures:
        assert _refused(future.result) == grpc.StatusCode.FAILED_PRECONDITION
    assert worker.store.stats() == before
    bystander.check()


def test_a_put_must_match_its_announcement_and_happens_once(cluster, bystander, attacker):
    s = attacker.slice({"d": 1}, island=0)
    stub = attacker.worker_stub(s.info.host_addresses[0])
    data = np.arange(4, dtype=np.float32)
    x = attacker.put(data, s)
    spec = pb.ArraySpec(array_id=x.id, dtype="float32", shape=[4],
                        sharding=pb.Sharding(slice_id=s.slice_id))
    # Once stored, no second put (it would replace data the computations already read).
    assert _refused(lambda: stub.PutArray(iter(_chunks(spec, data * 7)), timeout=20)) == (
        grpc.StatusCode.FAILED_PRECONDITION)
    np.testing.assert_array_equal(x.fetch(), data)

    declared = pb.ArraySpec(array_id=attacker._new_id(), dtype="float32", shape=[4],
                            sharding=pb.Sharding(slice_id=s.slice_id))
    attacker.controller_stub.RegisterArrays(pb.RegisterArraysRequest(session_id=attacker.session_id,
                                                           arrays=[declared]), timeout=30)
    lying = pb.ArraySpec(array_id=declared.array_id, dtype="float32", shape=[1 << 24],
                         sharding=declared.sharding)
    assert _refused(lambda: stub.PutArray(iter(_chunks(lying, np.zeros(1 << 24, np.float32))),
                                          timeout=20)) == grpc.StatusCode.INVALID_ARGUMENT
    # A stream whose headers repeat the shard past the array's shard count.
    header = pb.ShardHeader(index=_wire.index_to_proto(((0, 4),)), nbytes=16, mesh_positions=[0])
    repeated = [pb.ArrayChunk(spec=declared, shard=header, data=bytes(16))] + [
        pb.ArrayChunk(shard=header, data=bytes(16)) for _ in range(1000)]
    assert _refused(lambda: stub.PutArray(iter(repeated), timeout=20)) == (
        grpc.StatusCode.INVALID_ARGUMENT)
    # A header claiming terabytes for a declared four floats.
    huge = pb.ShardHeader(index=_wire.index_to_proto(((0, 10**12),)), nbytes=4 * 10**12,
                          mesh_positions=[0])
    assert _refused(lambda: stub.PutArray(iter([pb.ArrayChunk(spec=declared, shard=huge)]),
                                          timeout=20)) == grpc.StatusCode.INVALID_ARGUMENT
    # The declared array still takes its one honest put.
    assert stub.PutArray(iter(_chunks(declared, data)), timeout=20).nbytes == 16
    bystander.check()


def test_a_sessions_arrays_leave_its_hosts_when_it_ends(cluster, bystander):
    client = cluster.client("leaving")
    s = client.slice({"d": 2}, island=0)
    x = client.put(np.ones((8, 8), np.float32), s)
    y = client.jit(lambda v: v * 2, s)(x)
    y.fetch()
    worker = cluster.workers[0]
    assert len(_owned_on_host(worker, client.session_id)) >= 2
    session_id = client.session_id
    client.close()
    deadline = time.monotonic() + 30
    while _owned_on_host(worker, session_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _owned_on_host(worker, session_id) == []
    assert not [a for a in worker.announcements.announced() if a >> _auth.ID_BITS == session_id]
    bystander.check()


def test_a_failure_that_overtakes_its_announcement_is_kept_for_it():
    """The controller fails a transfer whose source island was lost, and the failure can reach
    the destination host before the announcement does: the array fails when announced."""
    import jax

    from proto.errors import ExecutionError
    from runtime.worker.worker import Worker

    worker = Worker(5, 0, jax.devices()[:1])
    try:
        worker.receive("controller", [])
        spec = pb.ArraySpec(array_id=77, dtype="float32", shape=[4],
                            sharding=pb.Sharding(slice_id=3))
        failed = pb.ArrayChunk(spec=spec, error="source island lost")
        assert worker.dataplane.put(iter([failed])) == 0
        assert not worker.store.contains(77)
        worker.receive("controller", [pb.Instruction(
            sequence=1, expect=pb.ExpectArrayInstruction(spec=spec))])
        with pytest.raises(ExecutionError, match="source island lost"):
            worker.store.get(77, 5.0)
        # A failure for an array that already holds its data changes nothing.
        worker.store.set(78, np.ones(4, np.float32), 16)
        assert worker.dataplane.put(iter([pb.ArrayChunk(spec=pb.ArraySpec(array_id=78),
                                              error="late")])) == 0
        np.testing.assert_array_equal(worker.store.get(78, 0.0), np.ones(4, np.float32))
    finally:
        worker.stop()
