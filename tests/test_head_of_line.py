"""No head-of-line blocking: a computation enters its island's order only once its inputs exist or
are produced by something already ordered. One reading a put that has not arrived waits in its
client's queue while other clients go ahead, runs once the put arrives, and fails (its request
gets DEADLINE_EXCEEDED) if the put never comes; the island's order never waits for it."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from proto import pathways_pb2 as pb
from proto import wire as _wire
from scheduler import GangScheduler


class _Stalled:
    """An attacker's array, declared (so the controller announces it) but not put, and a compiled
    `v + 1` on its slice that reads it."""

    def __init__(self, client, island: int) -> None:
        self.client = client
        self.slice = client.slice({"d": 2}, island=island)
        self.data = np.arange(8, dtype=np.float32)
        real = client.put(self.data, self.slice, P("d"))
        self.compiled = client.jit(lambda v: v + 1, self.slice, in_specs=P("d"),
                                   out_specs=P("d")).lower(real)
        self.spec = pb.ArraySpec(array_id=client._new_id(), dtype="float32", shape=[8],
                                 sharding=_wire.spec_to_proto(self.slice.slice_id, P("d")))
        client.controller_stub.RegisterArrays(pb.RegisterArraysRequest(session_id=client.session_id,
                                                             arrays=[self.spec]), timeout=30)

    def execute(self, commands, timeout: float):
        """Sends commands on a thread of their own: (thread, [reply or error])."""
        out = []

        def send():
            try:
                out.append(self.client.controller_stub.Execute(pb.ExecuteRequest(
                    session_id=self.client.session_id, commands=commands), timeout=timeout))
            except grpc.RpcError as err:
                out.append(err)

        thread = threading.Thread(target=send)
        thread.start()
        return thread, out

    def call(self, input_id: int) -> tuple[pb.Command, int]:
        output = self.client._new_id()
        return pb.Command(call=pb.Call(executable_id=self.compiled.executable_id,
                                       inputs=[input_id], outputs=[output])), output

    def put(self) -> None:
        stub = self.client.worker_stub(self.slice.info.host_addresses[0])
        shards = [(index, positions, self.data[_wire.as_slices(index)]) for index, positions in
                  _wire.shard_groups([8], self.slice.mesh_shape, self.spec.sharding)]
        stub.PutArray(_wire.iter_chunks(self.spec, shards), timeout=30)

    def fetch(self, array_id: int, sequence: int) -> np.ndarray:
        stub = self.client.worker_stub(self.slice.info.host_addresses[0])
        out = np.empty(8, np.float32)
        _, shards = _wire.assemble_chunks(stub.GetArray(pb.GetArrayRequest(
            array_id=array_id, timeout_s=30, after_sequence=sequence), timeout=30), out.dtype)
        for shard in shards:
            out[_wire.as_slices(shard.index)] = shard.data
        return out


@pytest.fixture
def attacker(cluster):
    client = cluster.client("stalling")
    yield client
    client.close()


def test_a_stalled_put_does_not_stop_the_island(cluster, bystander, attacker):
    stalled = _Stalled(attacker, island=0)
    command, _ = stalled.call(stalled.spec.array_id)
    thread, out = stalled.execute([command], timeout=8)
    time.sleep(0.5)  # the computation waits in the attacker's queue...
    started = time.monotonic()
    bystander.check()  # ...while the bystander's work on the same island goes ahead
    assert time.monotonic() - started < 20
    thread.join(30)
    (reply,) = out
    result = reply.results[0]
    assert result.error == "DeadlineExceededError", result
    assert f"input array {stalled.spec.array_id}" in result.message
    assert "does not exist yet" in result.message
    assert all(not island.failure for island in cluster.controller.status_report.status().islands)
    bystander.check()


def test_a_computation_runs_once_its_late_put_arrives(cluster, bystander, attacker):
    stalled = _Stalled(attacker, island=0)
    command, output = stalled.call(stalled.spec.array_id)
    thread, out = stalled.execute([command], timeout=60)
    bystander.check()
    stalled.put()
    thread.join(60)
    (reply,) = out
    assert not reply.results[0].error, reply.results[0]
    np.testing.assert_array_equal(stalled.fetch(output, reply.results[0].sequence[0]),
                                  stalled.data + 1)


def test_a_copy_of_a_stalled_put_does_not_stop_the_other_island(cluster, attacker):
    """The copy's send waits on the source's island, the computation reading the copy on the
    destination's; a bystander on the destination island goes ahead."""
    from conftest import Bystander

    bystander = Bystander(cluster, island=1)
    try:
        stalled = _Stalled(attacker, island=0)
        there = attacker.slice({"d": 2}, island=1)
        copy = attacker._new_id()
        transfer = pb.Command(transfer=pb.TransferCommand(
            source=stalled.spec.array_id, destination=copy,
            sharding=_wire.spec_to_proto(there.slice_id, P("d"))))
        f = attacker.jit(lambda v: v * 3, there, in_specs=P("d"), out_specs=P("d")).lower(
            attacker.put(stalled.data, there, P("d")))
        call = pb.Command(call=pb.Call(executable_id=f.executable_id, inputs=[copy],
                                       outputs=[attacker._new_id()]))
        thread, out = stalled.execute([transfer, call], timeout=8)
        time.sleep(0.5)
        bystander.check()
        thread.join(30)
        (reply,) = out
        assert [r.error for r in reply.results] == ["DeadlineExceededError"] * 2, reply
        bystander.check()
    finally:
        bystander.close()


def test_a_session_that_ends_drops_its_waiting_work(cluster, bystander):
    client = cluster.client("leaving")
    stalled = _Stalled(client, island=0)
    command, _ = stalled.call(stalled.spec.array_id)
    thread, out = stalled.execute([command], timeout=60)
    time.sleep(0.5)
    session_id = client.session_id
    client.close()
    thread.join(30)
    assert out and not thread.is_alive()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
            t.session_id == session_id for i in cluster.controller.status_report.status().islands
            for t in i.tenants):
        time.sleep(0.05)
    assert not [t for i in cluster.controller.status_report.status().islands for t in i.tenants
                if t.session_id == session_id]
    assert cluster.controller.readiness.blocking([stalled.spec.array_id]) is None
    bystander.check()


def test_the_gate_lets_others_go_first_opens_on_arrival_and_expires():
    """On a scheduler with a fake host: an execution reading an array not yet put waits while
    another tenant's is ordered; it is ordered once the host reports the array; a send waiting
    past input_wait_s fails alone."""
    from proto.errors import DeadlineExceededError
    from test_multitenant import calls, gang

    scheduler, link = gang(policy="fifo")
    try:
        scheduler.readiness.expect_put(100, 0, {0})
        blocked = scheduler.enqueue(1, [pb.Instruction(execute=pb.ExecuteInstruction(
            executable_id=1, inputs=[100]))])
        free = scheduler.enqueue(2, calls(2, 1))
        (first,) = free.wait(5)
        assert not blocked.done.is_set()
        scheduler.note_progress(0, 0, arrived=[100])
        (second,) = blocked.wait(5)
        assert second > first and not blocked.failed

        scheduler.input_wait_s = 0.2
        scheduler.readiness.expect_put(101, 0, {0})
        send = scheduler.enqueue(1, [pb.Instruction(send=pb.SendInstruction(array_id=101))])
        assert send.done.wait(5)
        assert isinstance(send.failed[0], DeadlineExceededError)
        assert "does not exist yet" in str(send.failed[0])
        after = scheduler.enqueue(1, calls(3, 1))
        assert after.wait(5)[0] > second
    finally:
        scheduler.close()


def test_a_deadline_orders_a_copy_and_its_reader_across_islands():
    """At a request's deadline its islands are forced together: the send ordered on one island
    makes the copy's reader on the other orderable, so neither fails. (Forced one island at a
    time, the reader, tried first, would fail for want of a send not yet forced.)"""
    from runtime.controller.ordering import Ordering
    from scheduler import Readiness
    from test_multitenant import FakeLink, calls

    readiness = Readiness()
    a, b = (GangScheduler(i, "controller", lambda *args: None, policy="fifo", window_s=1e-6,
                          link_factory=FakeLink, readiness=readiness) for i in (0, 1))
    try:
        for scheduler in (a, b):
            scheduler.set_host(0, "fake:0")
        b.enqueue(9, calls(1, 2))  # another tenant fills island 1's window: nothing else runs
        readiness.expect_send(20, 0)  # the copy on island 0 of array 11 of island 1
        on_a = a.enqueue(1, [pb.Instruction(expect=pb.ExpectArrayInstruction(
            spec=pb.ArraySpec(array_id=20))), pb.Instruction(execute=pb.ExecuteInstruction(
                executable_id=2, inputs=[20], outputs=[21]))])
        on_b = b.enqueue(1, [pb.Instruction(execute=pb.ExecuteInstruction(
            executable_id=3, outputs=[11])), pb.Instruction(send=pb.SendInstruction(
                array_id=11, destination=pb.ArraySpec(array_id=20)))])
        time.sleep(0.3)
        assert not on_a.done.is_set() and not on_b.done.is_set()
        sequence, errors, failed = Ordering({0: on_a, 1: on_b}).wait(0.2)
        assert not errors and not failed
        assert len(sequence) == 4 and all(sequence.values())
    finally:
        a.close()
        b.close()
