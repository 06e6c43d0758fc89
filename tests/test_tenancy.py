"""What a session leaves behind and what others learn of it: compiled programs are unloaded with
the last session using them, and GetStatus shows a client only its own sessions and slices unless
it holds the host token."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import rpc as _rpc
from runtime.controller import visibility as _visibility


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_compiled_programs_are_unloaded_with_their_last_session(cluster, bystander):
    worker = cluster.workers[0]
    controller = cluster.controller
    before = len(worker.executor._compile_cache)

    def scale(v):
        return v * 7.25 + 0.5  # a module no other test loads

    clients, executables, slices = [], [], []
    for name in ("first", "second"):
        client = cluster.client(name)
        s = client.slice({"d": 4}, island=0)  # every device of the island: one compilation
        f = client.jit(scale, s)
        x = client.put(np.ones(8, np.float32), s)
        np.testing.assert_array_equal(f(x).fetch(), np.full(8, 7.75, np.float32))
        clients.append(client)
        slices.append(s.slice_id)
        executables.append(f.lower(x).executable_id)
    keys = {worker.executor._loaded[e].cache_key for e in executables}
    assert len(keys) == 1 and keys <= set(worker.executor._compile_cache)

    clients[0].close()
    _wait_for(lambda: executables[0] not in worker.executor._loaded, "the first session's unload")
    assert executables[1] in worker.executor._loaded and keys <= set(worker.executor._compile_cache)

    clients[1].close()
    _wait_for(lambda: executables[1] not in worker.executor._loaded, "the second session's unload")
    assert not keys & set(worker.executor._compile_cache)
    assert len(worker.executor._compile_cache) == before
    assert not set(executables) & set(controller.catalog._executables)
    history = controller.catalog.scheduler(0)._history
    assert not [op for op in history if op.HasField("load") and op.load.slice_id in slices]
    assert not [op for op in history
                if op.HasField("define_slice") and op.define_slice.slice.slice_id in slices]
    bystander.check()


def test_status_shows_a_client_only_its_own_sessions(cluster, bystander):
    snooper = cluster.client("snooper")
    try:
        mine = snooper.slice({"d": 1}, island=0)
        snooper.jit(lambda v: v - 1, mine)(snooper.put(np.ones(4, np.float32), mine)).fetch()
        status = snooper.status()
        tenants = [t for island in status.islands for t in island.tenants]
        assert {t.session_id for t in tenants} == {snooper.session_id}
        assert "bystander" not in str(status)
        assert [s.slice_id for s in status.slices] == [mine.slice_id]
        assert status.sessions >= 2  # a count, no names

        # The cluster's own processes (the host token) see everyone.
        with _rpc.open_channel(cluster.address, cluster.controller.credentials) as channel:
            full = pb_grpc.ControllerStub(channel).GetStatus(pb.GetStatusRequest(), timeout=30)
        assert {bystander.client.session_id, snooper.session_id} <= {
            t.session_id for island in full.islands for t in island.tenants}
        assert bystander.slice.slice_id in {s.slice_id for s in full.slices}
        # A caller with the token but no session sees no one's.
        with _rpc.open_channel(cluster.address, cluster.credentials) as channel:
            anonymous = pb_grpc.ControllerStub(channel).GetStatus(pb.GetStatusRequest(),
                                                                  timeout=30)
        assert not anonymous.slices
        assert not [t for island in anonymous.islands for t in island.tenants]
    finally:
        snooper.close()
    bystander.check()


def test_what_a_host_runs_for_others_is_hidden():
    reply = pb.GetStatusReply(hosts=[
        pb.HostInfo(activity="running secret_step (#12, session 3) for 0.2 s",
                    current_name="secret_step"),
        pb.HostInfo(activity="running my_step (#13, session 4) for 0.1 s", current_name="my_step"),
        pb.HostInfo(activity="idle")])
    _visibility.restrict(reply, 4)
    assert [(h.activity, h.current_name) for h in reply.hosts] == [
        (_visibility.OTHERS_WORK, ""), ("running my_step (#13, session 4) for 0.1 s", "my_step"),
        ("idle", "")]


def test_a_status_lists_slices_within_its_budget(cluster, bystander, monkeypatch):
    monkeypatch.setattr(cluster.controller.status_report, "limits", dataclasses.replace(
        cluster.controller.limits, status_slice_bytes=1))
    status = cluster.controller.status_report.status()
    assert not status.slices and status.slices_omitted >= 1
