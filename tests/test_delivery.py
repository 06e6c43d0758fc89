"""A host's link reports to its scheduler through LinkEvents only (scheduler.delivery), and a
lost host takes one path: the link's report, the controller's health, the island's failure."""

import asyncio
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

import runtime
from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto.config import SchedulerConfig
from proto.errors import HostLostError, ResourceExhaustedError
from runtime.worker.distributed import free_port
from scheduler import GangScheduler
from scheduler.coalesce import HostReport, ProgressCoalescer
from scheduler.delivery import HostLink
from scheduler.link_loop import LinkLoop


class Events:
    """A scheduler as a link sees it (LinkEvents), recording the reports."""

    island, controller_id, epoch = 0, "controller", 0
    config = SchedulerConfig()

    channel_metadata = ()

    def __init__(self):
        self.lost, self.progress = [], []
        self.reported = threading.Event()
        self.reports = ProgressCoalescer(lambda reports: self.progress.extend(
            (r.host, r.executed, r.received) for r in reports))

    def open_channel(self, address):
        return grpc.aio.insecure_channel(address)

    def on_link_lost(self, host, reason):
        self.lost.append((host, reason))
        self.reported.set()


def test_a_link_to_a_host_that_is_gone_reports_its_loss_once_and_drops_its_queue():
    events = Events()
    link = HostLink(events, 3, f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        link.send([pb.Instruction(sequence=1, delete=pb.DeleteInstruction(array_ids=[1]))])
        assert events.reported.wait(30)
        time.sleep(0.2)  # a second report, if there were one, would come now
        ((host, reason),) = events.lost
        assert host == 3 and reason.startswith("dispatch failed: UNAVAILABLE")
        assert link.failed == reason and link.pending() == 0
        link.send([pb.Instruction(sequence=2, delete=pb.DeleteInstruction(array_ids=[2]))])
        assert link.pending() == 0  # a failed link takes nothing more
        assert events.progress == []
    finally:
        link.close()
        link.join(5)


class _FailedLink:
    def __init__(self, scheduler, host, address):
        self.host, self.address = host, address
        self.acked = self.executed = 0
        self.failed = ""

    def send(self, ops):
        pass

    def pending(self):
        return 0

    def close(self):
        pass

    def join(self, timeout):
        pass


def test_a_lost_link_goes_to_the_controllers_health_which_fails_the_island_once():
    reports = []

    def health(island, host, reason):  # as runtime.controller.health.report_host_lost does
        reports.append((island, host, reason))
        scheduler.fail(HostLostError(f"host {island}.{host} (fake:0) of island {island} was "
                                     f"lost: {reason}"))

    scheduler = GangScheduler(0, "controller", health, link_factory=_FailedLink)
    try:
        scheduler.set_host(0, "fake:0")
        scheduler._links[0].failed = "dispatch failed: UNAVAILABLE"
        scheduler.on_link_lost(0, "dispatch failed: UNAVAILABLE")
        assert reports == [(0, 0, "dispatch failed: UNAVAILABLE")]
        assert isinstance(scheduler.failure, HostLostError)
        assert "of island 0 was lost" in str(scheduler.failure)  # the health's report, alone
    finally:
        scheduler.close()


def test_a_lost_link_of_a_host_the_health_does_not_know_still_fails_the_island():
    scheduler = GangScheduler(0, "controller", lambda *report: None, link_factory=_FailedLink)
    try:
        scheduler.set_host(0, "fake:0")
        scheduler._links[0].failed = "progress stream lost: gone"
        scheduler.on_link_lost(0, "progress stream lost: gone")
        assert isinstance(scheduler.failure, HostLostError)
        assert "progress stream lost: gone" in str(scheduler.failure)
    finally:
        scheduler.close()


def test_a_lost_link_whose_host_the_heartbeat_declared_lost_a_moment_ago_names_its_address():
    # The heartbeat's report_host_lost marked the host lost and has not yet failed the island
    # when the link's report arrives: the health returns at once (already lost), so the island's
    # failure is set here, and it still names the host's address (as the health's would).
    scheduler = GangScheduler(0, "controller", lambda *report: None, link_factory=_FailedLink)
    try:
        scheduler.set_host(0, "fake:7")
        scheduler.on_link_lost(0, "not reached through the fan-out tree")
        assert isinstance(scheduler.failure, HostLostError)
        assert "host 0.0 (fake:7) was lost: not reached" in str(scheduler.failure)
    finally:
        scheduler.close()


class _RecordingLink:
    """A host's link that delivers nothing by itself: what it holds stays unacknowledged until
    the test reports the host's receipt (scheduler.note_progress)."""

    def __init__(self, scheduler, host, address):
        self.host, self.address = host, address
        self.sent, self.closed = [], False
        self.acked = self.executed = 0
        self.failed = ""

    def send(self, ops):
        self.sent.extend(ops)

    def unacknowledged(self):
        return [op for op in self.sent if op.sequence > self.acked]

    def pending(self):
        return len(self.unacknowledged())

    def close(self):
        self.closed = True

    def join(self, timeout):
        pass


def _deletes(*array_ids):
    return [pb.Instruction(delete=pb.DeleteInstruction(array_ids=[i])) for i in array_ids]


def test_a_live_host_that_registers_again_gets_everything_it_had_not_acknowledged_in_order():
    scheduler = GangScheduler(0, "controller", lambda *report: None,
                              link_factory=_RecordingLink)
    try:
        scheduler.set_host(0, "fake:0")
        define = pb.Instruction(define_slice=pb.DefineSliceInstruction(
            slice=pb.SliceInfo(slice_id=7)))
        assert scheduler.submit([define] + _deletes(1, 2, 3, 4)) == [1, 2, 3, 4, 5]
        scheduler.note_progress(0, executed=2, received=3)  # the host holds #1-#3
        old = scheduler._links[0]
        scheduler.set_host(0, "fake:0")  # the same live host registers again
        new = scheduler._links[0]
        assert old.closed and new is not old
        # The slice's definition (the history every joining host gets), then what the host had
        # not acknowledged: each once, in order.
        assert [op.sequence for op in new.sent] == [1, 4, 5]
        scheduler.submit(_deletes(5))
        assert [op.sequence for op in new.sent] == [1, 4, 5, 6]
    finally:
        scheduler.close()


def test_a_client_waits_while_the_slowest_host_is_too_far_behind_and_goes_on_once_it_catches_up():
    scheduler = GangScheduler(0, "controller", lambda *report: None,
                              link_factory=_RecordingLink)
    try:
        scheduler.set_host(0, "fake:0")
        scheduler.set_host(1, "fake:1")
        scheduler.submit(_deletes(*range(1, 11)))  # #1-#10 ordered, nothing executed yet
        scheduler.wait_backlog(limit=20, timeout=0.0)  # well within the limit: no wait at all
        with pytest.raises(ResourceExhaustedError, match="more than 8 instructions behind"):
            scheduler.wait_backlog(limit=8, timeout=0.2)
        scheduler.note_progress(0, executed=10, received=10)
        with pytest.raises(ResourceExhaustedError):  # host 1 is the slowest: still #0
            scheduler.wait_backlog(limit=8, timeout=0.2)
        caught_up = threading.Timer(0.1, scheduler.note_progress, (1,), {"executed": 5,
                                                                       "received": 10})
        caught_up.start()
        began = time.monotonic()
        scheduler.wait_backlog(limit=8, timeout=30)  # returns once host 1 is 5 behind
        assert time.monotonic() - began < 29
        caught_up.join()
    finally:
        scheduler.close()


class _SlowHost(pb_grpc.WorkerServicer):
    """A host's control server that records the instructions it receives; while `hold` is set,
    a Dispatch waits, and one cancelled while it waits is not received (its message was lost)."""

    def __init__(self):
        self.received, self.hold, self.holding = [], threading.Event(), threading.Event()
        self.lock = threading.Lock()

    def Dispatch(self, request, context):
        while self.hold.is_set() and context.is_active():
            self.holding.set()
            time.sleep(0.01)
        if not context.is_active():
            return pb.DispatchReply()
        with self.lock:
            held = {seq for seq in self.received}
            self.received.extend(i.sequence for i in request.instructions
                                 if i.sequence not in held)  # a resend is skipped
            return pb.DispatchReply(received=max(self.received, default=0))

    def WatchProgress(self, request, context):
        return iter(())  # no reports: the link opens the stream again later


def test_a_dispatch_lost_with_the_old_link_reaches_the_host_on_its_new_link():
    host = _SlowHost()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_WorkerServicer_to_server(host, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    scheduler = GangScheduler(0, "controller", lambda *report: None)
    try:
        scheduler.set_host(0, address)
        host.hold.set()
        scheduler.submit(_deletes(1, 2))
        assert host.holding.wait(30)  # #1-#2 are on the wire, unanswered
        scheduler.submit(_deletes(3, 4))  # queued on the old link behind them
        scheduler.set_host(0, address)  # the host registers again: the old link closes
        host.hold.clear()
        scheduler.flush(30)
        assert host.received == [1, 2, 3, 4]
    finally:
        scheduler.close()
        server.stop(0)


def _numbered(*sequences):
    return [pb.Instruction(sequence=q, delete=pb.DeleteInstruction(array_ids=[q]))
            for q in sequences]


def test_a_relayed_link_waits_after_a_direct_catch_up_while_the_tree_owes_its_host_more():
    """A relayed host gets a catch-up directly; instructions the tree is to bring it arrive
    meanwhile. Once the catch-up is answered the link's sender must wait for its own queue, not
    loop on what the tree owes (it spun the whole link loop: every host of the controller went
    without dispatches, a 75 s stall in `pathways bench scale` at 1,024 hosts under load)."""
    host = _SlowHost()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_WorkerServicer_to_server(host, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()

    class Overdue(Events):
        config = SchedulerConfig(relay_timeout_s=0.0)  # every relayed instruction is overdue

    loop = LinkLoop("test-links")  # not the shared loop: a spin must not freeze other tests
    link = HostLink(Overdue(), 0, address, loop=loop)
    try:
        link.route(None)  # reached through another host
        link.send(_numbered(1, 2))
        host.hold.set()
        link.check_relayed()  # #1-#2 overdue: sent directly
        assert host.holding.wait(30)
        link.send(_numbered(3))  # the tree's, not acknowledged
        host.hold.clear()
        deadline = time.monotonic() + 30
        while host.received != [1, 2] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert host.received == [1, 2]
        time.sleep(0.2)  # the sender is past the reply
        loop.submit(asyncio.sleep(0)).result(timeout=5)  # the loop still turns
        assert link.pending() == 1  # #3 is still the tree's
    finally:
        link.close()
        server.stop(0)


def test_work_completes_when_its_live_host_registers_again_mid_stream():
    with runtime.LocalCluster(islands=1, devices_per_island=1) as cluster:
        client = cluster.client()
        try:
            devices = client.slice({"d": 1}, island=0)
            step = client.jit(lambda v: v + 1, devices)
            x = client.put(np.zeros(4, np.float32), devices)
            step(x).fetch(timeout=60)  # compiled
            for i in range(1, 301):
                x = step(x)
                if i % 20 == 0:  # as after a silence: the same live host, a new link
                    cluster.controller.health.register_host(cluster.workers[0].info())
            np.testing.assert_array_equal(x.fetch(timeout=30), [300] * 4)
        finally:
            client.close()


def test_reports_of_one_loop_turn_reach_the_scheduler_as_one_batch_merged_per_host():
    batches = []
    coalescer = ProgressCoalescer(batches.append)
    loop = LinkLoop.shared()

    def report_all():
        for host in range(64):
            coalescer.add(HostReport(host, executed=1, received=2))
        coalescer.add(HostReport(3, executed=4, received=5,
                                 completed=[pb.CompletedExecution(sequence=4)], arrived=[9]))

    loop.call(report_all)
    loop.submit(asyncio.sleep(0.05)).result(10)
    assert len(batches) == 1 and coalescer.reports == 65
    (batch,) = batches
    assert sorted(r.host for r in batch) == list(range(64))
    merged = next(r for r in batch if r.host == 3)
    assert (merged.executed, merged.received, merged.arrived) == (4, 5, [9])
    assert [c.sequence for c in merged.completed] == [4]


def test_a_heartbeat_costs_no_call_to_a_host_that_answered_a_dispatch_lately():
    events = Events()
    link = HostLink(events, 3, f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        with pytest.raises(grpc.RpcError) as failed:  # no dispatch yet: a real Ping, refused
            link.ping(timeout=5, fresh_s=1.0).result(10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        link.executed, link.heard_at = 7, time.monotonic()
        assert link.ping(timeout=5, fresh_s=1.0).result(0).executed == 7  # answered at once
        with pytest.raises(grpc.RpcError):
            link.ping(timeout=5).result(10)  # without freshness allowed, a real Ping
    finally:
        link.close()
        link.join(5)


def test_links_to_many_hosts_share_one_thread():
    before = threading.active_count()
    scheduler = GangScheduler(0, "controller", lambda *report: None)
    try:
        for host in range(64):  # nothing listens there: each link retries its progress stream
            scheduler.set_host(host, f"127.0.0.1:{free_port()}")
        time.sleep(0.5)
        assert threading.active_count() - before <= 3  # the pump, the link loop (if new)
        assert not [t.name for t in threading.enumerate()
                    if t.name.startswith(("dispatch-", "progress-"))]
    finally:
        scheduler.close()


class _ReportingHost(pb_grpc.WorkerServicer):
    """A host's control server whose progress streams report every 20 ms, recording the least
    interval each stream asked for."""

    def __init__(self):
        self.asked = []

    def WatchProgress(self, request, context):
        self.asked.append(request.min_interval_s)
        while context.is_active():
            yield pb.WatchProgressReply()
            time.sleep(0.02)


def test_a_big_island_asks_each_host_for_fewer_reports_and_its_links_reopen_their_streams():
    rate = SchedulerConfig().progress_island_rate
    base = SchedulerConfig().progress_interval_s
    scheduler = GangScheduler(0, "controller", lambda *report: None)
    try:
        assert scheduler.report_interval == base  # one host
        scheduler._links = dict.fromkeys(range(int(rate * base) * 4))
        assert scheduler.report_interval == pytest.approx(4 * base)  # 4x the hosts: 1/4 each
        scheduler._links = dict.fromkeys(range(int(rate * base) * 4 + 1))
        assert scheduler.report_interval == pytest.approx(8 * base)  # powers of two only
    finally:
        scheduler._links = {}
        scheduler.close()
    host = _ReportingHost()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_WorkerServicer_to_server(host, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    link = HostLink(Events(), 0, address)
    try:
        deadline = time.monotonic() + 30
        while not host.asked and time.monotonic() < deadline:
            time.sleep(0.01)
        link.report_interval_s = 0.04  # the island grew
        while len(host.asked) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert host.asked[:2] == [base, 0.04]
    finally:
        link.close()
        link.join(5)
        server.stop(0)
