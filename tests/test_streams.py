"""Stream floods: a session has a bounded number of calls open on a host (and on the controller),
calls idle on their client are cancelled, a full server still takes a call from a session that
holds fewer, and the heartbeat and dispatch travel on the host's control server, so a flooded host
is never declared lost. After each flood a bystander's work and the cluster's status are
unaffected."""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc
import numpy as np
import pytest

import runtime
from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import rpc as _rpc
from proto.limits import DEFAULT

IDLE_S = 1.0


class _Stall:
    """A put stream of a declared float32[4] that sends its spec and a quarter of its bytes, and
    then nothing until released."""

    def __init__(self, spec: pb.ArraySpec) -> None:
        header = pb.ShardHeader(index=pb.ShardIndex(start=[0], stop=[4]), nbytes=16,
                                mesh_positions=[0])
        self.first = pb.ArrayChunk(spec=spec, shard=header, data=bytes(4))
        self.release = threading.Event()

    def __iter__(self):
        yield self.first
        self.release.wait(60)


def _declare(client, s, n: int) -> list[pb.ArraySpec]:
    specs = [pb.ArraySpec(array_id=client._new_id(), dtype="float32", shape=[4],
                          sharding=pb.Sharding(slice_id=s.slice_id)) for _ in range(n)]
    client.controller_stub.RegisterArrays(pb.RegisterArraysRequest(session_id=client.session_id,
                                                         arrays=specs), timeout=30)
    return specs


def _outcome(future) -> grpc.StatusCode:
    try:
        future.result()
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


@pytest.fixture
def short_idle(cluster, monkeypatch):
    """Streams idle on their client for IDLE_S seconds are cancelled, on every host."""
    for worker in cluster.workers:
        monkeypatch.setattr(worker.admission, "limits",
                            dataclasses.replace(DEFAULT, stream_idle_s=IDLE_S))


def test_a_flood_of_idle_put_streams_is_bounded_and_cancelled(cluster, bystander, short_idle):
    attacker = cluster.client("flood")
    try:
        s = attacker.slice({"d": 1}, island=0)
        stub = attacker.worker_stub(s.info.host_addresses[0])
        stalls = [_Stall(spec) for spec in _declare(attacker, s, 80)]
        calls = [stub.PutArray.future(iter(stall), timeout=60) for stall in stalls]
        admission = cluster.workers[0].admission
        deadline = time.monotonic() + 30
        refused = []
        while len(refused) < 80 - DEFAULT.streams_per_session and time.monotonic() < deadline:
            refused = [c for c in calls if c.done()]
            time.sleep(0.05)
        assert {_outcome(c) for c in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert admission.open_calls(attacker.session_id) <= DEFAULT.streams_per_session
        bystander.check()  # its puts and fetches have an allowance of their own
        # The admitted streams wait on their client: cancelled once idle for IDLE_S.
        for call in calls:
            assert _outcome(call) in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      grpc.StatusCode.CANCELLED)
        deadline = time.monotonic() + 10
        while admission.open_calls(attacker.session_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert admission.open_calls(attacker.session_id) == 0
        for stall in stalls:
            stall.release.set()
        bystander.check()
    finally:
        attacker.close()


def test_many_flooding_sessions_cannot_lock_another_out(cluster, bystander, monkeypatch):
    """Four sessions hold all the client calls a host serves; a bystander's fetch still gets one
    (an idle call of the biggest holder is cancelled for it), and so does its put."""
    for worker in cluster.workers:
        monkeypatch.setattr(worker.admission, "limits",
                            dataclasses.replace(DEFAULT, stream_idle_s=600))
    attackers = [cluster.client(f"flood{i}") for i in range(4)]
    stalls, calls = [], []
    try:
        for attacker in attackers:
            s = attacker.slice({"d": 1}, island=0)
            stub = attacker.worker_stub(s.info.host_addresses[0])
            for spec in _declare(attacker, s, DEFAULT.streams_per_session):
                stalls.append(_Stall(spec))
                calls.append(stub.PutArray.future(iter(stalls[-1]), timeout=60))
        admission = cluster.workers[0].admission
        deadline = time.monotonic() + 30
        while (admission.open_calls() < DEFAULT.client_calls
               and sum(c.done() for c in calls) < len(calls) - DEFAULT.client_calls
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert admission.open_calls() >= DEFAULT.client_calls - 1
        bystander.check()
    finally:
        for stall in stalls:
            stall.release.set()
        for attacker in attackers:
            attacker.close()


def test_the_controller_bounds_a_sessions_concurrent_calls(cluster, bystander):
    """Calls that wait (here for hosts to answer a status) count against their session's
    allowance; one past it fails at once; others' calls go on."""
    attacker = cluster.client("busy")
    admission = cluster.controller.admission
    try:
        release = threading.Event()
        report = cluster.controller.status_report
        original = report.status
        entered = threading.Semaphore(0)

        def slow_status(*args, **kwargs):
            entered.release()
            release.wait(30)
            return original(*args, **kwargs)

        report.status = slow_status
        try:
            calls = [attacker.controller_stub.GetStatus.future(pb.GetStatusRequest(), timeout=60)
                     for _ in range(DEFAULT.calls_per_session + 4)]
            for _ in range(DEFAULT.calls_per_session):
                assert entered.acquire(timeout=30)
            deadline = time.monotonic() + 10
            while sum(c.done() for c in calls) < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert [_outcome(c) for c in calls if c.done()] == [
                grpc.StatusCode.RESOURCE_EXHAUSTED] * 4
            assert admission.open_calls(attacker.session_id) == DEFAULT.calls_per_session
        finally:
            report.status = original
            release.set()
        assert all(_outcome(c) in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
                   for c in calls)
        bystander.check()
    finally:
        attacker.close()


def _wait_until_full(stub: pb_grpc.WorkerStub) -> None:
    """Returns once a server's every thread is held: a ping waits in its queue."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            stub.Ping(pb.PingRequest(), timeout=0.5)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            return
        time.sleep(0.1)
    pytest.fail("the streams did not take every thread of the server")


def test_a_host_with_every_thread_busy_keeps_its_heartbeat_and_dispatch():
    """Every thread of a host's main server is held (by streams with the host token, which no
    limit applies to); the controller still pings it on its control server, dispatch goes on, and
    the host is not declared lost."""
    with runtime.LocalCluster(islands=1, devices_per_island=2) as cluster:
        client = cluster.client("user")
        s = client.slice({"d": 2})
        x = client.put(np.arange(8, dtype=np.float32), s)
        double = client.jit(lambda v: v * 2, s)
        double(x).fetch()
        worker = cluster.workers[0]
        assert worker.control_address and worker.control_address != worker.address
        host_credentials = cluster.controller.credentials  # the host token too
        stalls, calls = [], []
        with _rpc.open_channel(worker.address, host_credentials) as channel:
            stub = pb_grpc.WorkerStub(channel)
            for spec in _declare(client, s, 70):
                stalls.append(_Stall(spec))
                calls.append(stub.PutArray.future(iter(stalls[-1]), timeout=60))
            try:
                _wait_until_full(stub)
                executed = worker.executions
                y = double(x)  # dispatched over the control server
                deadline = time.monotonic() + 30
                while worker.executions == executed and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert worker.executions > executed
                time.sleep(2.5)  # five heartbeats
                status = cluster.controller.status_report.status()
                assert [h.state for h in status.hosts] == ["alive"]
                assert "not answering" not in status.hosts[0].activity
                assert not status.islands[0].failure
            finally:
                for stall in stalls:
                    stall.release.set()
            np.testing.assert_array_equal(y.fetch(timeout=60), np.arange(8) * 2)


def test_waiting_fetches_count_against_their_sessions_allowance(cluster, bystander):
    """Fetches waiting on a host for an array that never comes hold the session's allowance;
    one more is refused at once; the bystander's fetches are not."""
    attacker = cluster.client("waiting")
    try:
        s = attacker.slice({"d": 1}, island=0)
        (spec,) = _declare(attacker, s, 1)
        stub = attacker.worker_stub(s.info.host_addresses[0])
        request = pb.GetArrayRequest(array_id=spec.array_id, timeout_s=60)
        admission = cluster.workers[0].admission
        # The calls of earlier tests' sessions on this shared host may still be ending on a
        # loaded machine; while the host is full, new calls would be refused, not left waiting.
        deadline = time.monotonic() + 120
        while admission.open_calls() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not admission.open_calls(), "earlier tests' calls still open on the host"
        # The array's announcement reaches the host through the island's order, after
        # RegisterArrays returns; a fetch that came first would be refused (NOT_FOUND), not wait.
        announced = cluster.workers[0].dataplane.announcements
        while announced.spec(spec.array_id) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        waiting = [stub.GetArray(request, timeout=60) for _ in range(DEFAULT.streams_per_session)]
        deadline = time.monotonic() + 120  # a starved machine is slow to start 16 calls
        while (admission.open_calls(attacker.session_id) < DEFAULT.streams_per_session
               and time.monotonic() < deadline):
            time.sleep(0.05)
        ended = [(c.code(), c.details()) for c in waiting if c.done()]
        assert admission.open_calls(attacker.session_id) == DEFAULT.streams_per_session, ended
        with pytest.raises(grpc.RpcError) as info:
            next(stub.GetArray(request, timeout=10))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "its limit of 16" in info.value.details()
        bystander.check()
        for call in waiting:
            call.cancel()
        deadline = time.monotonic() + 10
        while admission.open_calls(attacker.session_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert admission.open_calls(attacker.session_id) == 0
    finally:
        attacker.close()
