"""The controller's heartbeat (runtime.controller.health): one round pings every host at once, so
a silent host delays nobody else's ping; a host that refuses is still declared lost."""

from __future__ import annotations

import threading
import time

import grpc

from proto import auth as _auth
from proto import pathways_pb2 as pb
from proto.config import SchedulerConfig
from runtime.controller.defaults import HEARTBEAT_MISSES
from runtime.controller.health import Health
from scheduler.readiness import Readiness
from scheduler.resources import ResourceManager


class _Error(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return self._code.name


class _Call:
    """A Ping in flight; its answer is decided when it is read."""

    def __init__(self, answer):
        self._answer = answer

    def result(self, timeout=None):
        return self._answer()


class _Ping:
    """A host's Ping method, blocking or as a future: records that the host was pinged."""

    def __init__(self, heartbeat, key, answer):
        self.heartbeat, self.key, self.answer = heartbeat, key, answer

    def __call__(self, request, timeout=None):
        self.heartbeat.pinged.append(self.key)
        return self.answer()

    def future(self, request, timeout=None):
        self.heartbeat.pinged.append(self.key)
        return _Call(self.answer)


class _Stub:
    def __init__(self, ping):
        self.Ping = ping


class _Island:
    def __init__(self):
        self.progress = []
        self.heard = set()  # hosts the island heard from lately
        self.kept_alive = 0  # heartbeat rounds that reached its fan-out tree

    def keep_alive(self, delay=0.0, quiet_s=0.0):
        self.kept_alive += 1

    def heard_lately(self, fresh_s):
        return set(self.heard)

    def note_reports(self, reports):
        self.progress.extend((r.host, r.executed) for r in reports)

    def ping(self, host, timeout, fresh_s=0.0):
        return None  # no link to the host: the heartbeat pings on its probe's channel


class _Heartbeat(Health):
    """A controller's Health (its heartbeat not started) whose hosts answer as the test sets;
    the hosts it declares lost are recorded, not failed."""

    def __init__(self, answers):
        self.island = _Island()
        super().__init__(threading.RLock(), ResourceManager(), {0: self.island},
                         controller_id="controller", policy="fifo",
                         credentials=_auth.Credentials(), readiness=Readiness(),
                         scheduler_config=SchedulerConfig(), forget_island=lambda island: None,
                         heartbeat=False)
        self.pinged, self.lost = [], []
        self._probes = {(0, host): (None, _Stub(_Ping(self, (0, host), answer)))
                        for host, answer in enumerate(answers)}

    def report_host_lost(self, island, host, reason):
        self.lost.append((island, host, reason))

    def run(self, timeout=30.0):
        thread = threading.Thread(target=self._heartbeat_loop, daemon=True)
        thread.start()
        thread.join(timeout)
        self._stop.set()
        thread.join(5)
        assert not thread.is_alive()


def _answers(executed):
    return lambda: pb.PingReply(executed=executed)


def test_a_silent_host_delays_no_other_hosts_ping():
    hosts = 16
    seen_by_silent: list[set] = []

    def silent():  # host 0 runs out its ping's deadline
        seen_by_silent.append(set(heartbeat.pinged))
        heartbeat._stop.set()
        raise _Error(grpc.StatusCode.DEADLINE_EXCEEDED)

    heartbeat = _Heartbeat([silent] + [_answers(7) for _ in range(hosts - 1)])
    heartbeat.run()
    # By the time host 0's ping ran out, every host had been pinged: a round costs one deadline,
    # not one per silent host ahead in line.
    assert seen_by_silent == [{(0, host) for host in range(hosts)}]
    assert heartbeat.lost == []


def _refuses():
    raise _Error(grpc.StatusCode.UNAVAILABLE)


def _run_until_a_loss(heartbeat: _Heartbeat) -> bool:
    """Runs the heartbeat until it declares a host lost; whether it did."""
    lost = threading.Event()
    report = heartbeat.report_host_lost

    def report_and_stop(island, host, reason):
        report(island, host, reason)
        lost.set()
        heartbeat._stop.set()

    heartbeat.report_host_lost = report_and_stop
    heartbeat.run()
    return lost.is_set()


def test_a_host_that_refuses_is_declared_lost_and_the_others_report_progress():
    heartbeat = _Heartbeat([_answers(3), _refuses, _answers(5)])
    assert _run_until_a_loss(heartbeat)
    assert heartbeat.lost == [(0, 1, "unreachable (UNAVAILABLE)")]
    assert heartbeat.pinged.count((0, 1)) == HEARTBEAT_MISSES
    assert {(0, 3), (2, 5)} <= set(heartbeat.island.progress)


def test_a_ping_on_a_link_replaced_meanwhile_is_no_refusal():
    """A host that registered again while its ping was on the way: the old link or channel is
    closed (ValueError). That says nothing of the host, which must not be declared lost."""
    rounds = []

    def replaced():
        rounds.append(1)
        if len(rounds) > 2 * HEARTBEAT_MISSES:
            heartbeat._stop.set()
        raise ValueError("the link is closed")

    heartbeat = _Heartbeat([replaced, _answers(4)])
    heartbeat.run()
    assert len(rounds) > 2 * HEARTBEAT_MISSES and heartbeat.lost == []


def test_an_idle_host_with_a_progress_stream_is_not_pinged_and_hears_the_controller(monkeypatch):
    """An idle host's progress stream reports every `progress_idle_s`; the controller counts each
    report as the host's answer to its heartbeat (no Ping RPC), and the host counts the stream
    as the controller's contact (it does not register again)."""
    import runtime
    from runtime.worker import servicer as worker_servicer

    pinged = []
    ping = worker_servicer.WorkerServicer.Ping

    def counted(self, request, context):
        pinged.append(time.monotonic())
        return ping(self, request, context)

    monkeypatch.setattr(worker_servicer.WorkerServicer, "Ping", counted)
    with runtime.LocalCluster(islands=1, devices_per_island=2) as cluster:
        worker = cluster.workers[0]
        # The links and their progress streams open; a stream's first idle report comes after
        # its interval (1 s), and a heartbeat round until then may ping the host.
        time.sleep(2.0)
        start = time.monotonic()
        pinged.clear()
        oldest_contact = 0.0
        while time.monotonic() - start < 3.0:  # six heartbeat intervals, idle
            oldest_contact = max(oldest_contact, time.monotonic() - worker.last_contact)
            time.sleep(0.05)
        assert pinged == []
        assert oldest_contact < 1.5  # one idle report a second, each a contact


def test_a_host_heard_from_lately_costs_the_heartbeat_no_call_and_is_never_declared_lost():
    heartbeat = _Heartbeat([_refuses, _refuses])
    heartbeat.island.heard = {1}  # host 1 answered a Dispatch or reported within the interval
    assert _run_until_a_loss(heartbeat)
    assert heartbeat.lost == [(0, 0, "unreachable (UNAVAILABLE)")]
    assert (0, 1) not in heartbeat.pinged
