"""A host registers again when its controller restarts, and reports when its controller is slow
(runtime.worker.membership)."""

from __future__ import annotations

import asyncio
import time

import jax

from proto import auth as _auth
from runtime.server import Controller, create_controller_server
from runtime.worker import membership as _membership
from runtime.worker.membership import Membership, report_due
from runtime.server import Worker, create_worker_server


def test_host_registers_again_after_a_controller_restart():
    worker = Worker(0, 0, jax.devices()[:1])
    worker_server, _ = create_worker_server(worker)
    first = Controller(heartbeat=False)
    server, port = create_controller_server(first)
    address = f"127.0.0.1:{port}"
    heard = [True]  # whether "a controller" is pinging the host right now
    membership = Membership(address, worker.info,
                            lambda: time.monotonic() if heard[0] else 0.0, silence_s=0.6)
    second = None
    try:
        membership.start(timeout=10)
        assert [h.address for h in first.resources.hosts()] == [worker.address]
        heard[0] = False
        server.stop(None)
        first.close()
        second = Controller(heartbeat=False)
        server, _ = create_controller_server(second, address)
        deadline = time.monotonic() + 10
        while not second.resources.hosts() or membership.registrations < 2:
            assert time.monotonic() < deadline, "the host did not register again"
            time.sleep(0.05)
        assert [h.address for h in second.resources.hosts()] == [worker.address]
        assert membership.registrations == 2
        heard[0] = True  # pinged again: no further registrations
        time.sleep(1.0)
        assert membership.registrations == 2
    finally:
        membership.stop(unregister_host=False)
        server.stop(None)
        (second or first).close()
        worker_server.stop(None)
        worker.stop()


def test_registration_carries_credentials():
    credentials = _auth.Credentials.generate()
    assert credentials.for_clients().host_token is None
    env = credentials.worker_environment()
    assert env[_auth.TOKEN_ENV] == credentials.token
    assert env[_auth.HOST_TOKEN_ENV] == credentials.host_token
    assert credentials.token not in repr(credentials)
    assert credentials.host_token not in repr(credentials)


def test_an_arrival_is_reported_at_once_not_after_the_streams_interval():
    from proto import pathways_pb2 as pb

    worker = Worker(0, 0, jax.devices()[:1])
    try:
        reports = worker.watch_progress(pb.WatchProgressRequest(min_interval_s=1.0),
                                        lambda: True)
        worker.report_soon()
        next(reports)  # the first report; the stream now waits its interval before the next
        worker.report_soon()  # an array's data arrived (or a hang): the controller waits on it
        started = time.monotonic()
        next(reports)
        assert time.monotonic() - started < 0.95  # without it, at least the 1 s interval
        started = time.monotonic()
        worker._progress.set()  # the executor moved on: that waits out the interval
        next(reports)
        assert time.monotonic() - started >= 0.9
    finally:
        worker.stop()


def test_a_host_reports_once_silent_for_half_the_limit_and_registers_again_at_the_limit():
    assert not report_due(1.4, silence_s=3.0)
    assert report_due(1.5, silence_s=3.0) and report_due(2.9, silence_s=3.0)
    assert not report_due(3.0, silence_s=3.0)  # past the limit: it registers again instead


def _silent_host(reports: bool):
    """A host no controller calls; `reports`: its progress stream is open, so a report it is
    asked for, taken by the controller, counts as contact."""
    host = type("Host", (), {})()
    host.last_contact, host.asked = time.monotonic(), 0

    def report() -> None:
        host.asked += 1
        if reports:
            host.last_contact = time.monotonic()

    host.report = report
    return host


def test_a_host_of_a_slow_controller_stays_registered_by_its_own_reports():
    """The heartbeat's empty Dispatch reaches a fan-out tree's idle hosts (which report only
    every 10 s); a controller too busy to send it in time gets their reports instead, and they
    stay registered. A host without an open stream to report on registers again."""
    worker = Worker(0, 0, jax.devices()[:1])
    worker_server, _ = create_worker_server(worker)
    controller = Controller(heartbeat=False)
    server, port = create_controller_server(controller)
    try:
        for reports in (True, False):
            host = _silent_host(reports)
            membership = Membership(f"127.0.0.1:{port}", worker.info, lambda: host.last_contact,
                                    silence_s=0.6, report=host.report)
            membership.start(timeout=10)
            time.sleep(1.5)  # 2.5 silence limits
            membership.stop(unregister_host=False)
            assert host.asked >= 1
            assert (membership.registrations > 1) == (not reports)  # registered again
    finally:
        server.stop(None)
        controller.close()
        worker_server.stop(None)
        worker.stop()


def test_a_simulated_process_asks_its_silent_hosts_for_reports(monkeypatch):
    """The same, for a process of simulated hosts: one loop checks all its hosts."""
    from runtime.sim._config import SimConfig
    from runtime.sim._process import SimIslands

    registered = []
    monkeypatch.setattr(_membership, "SILENCE_S", 0.6)
    monkeypatch.setattr(_membership, "register", lambda *args: registered.append(args[1]))
    sim = SimIslands("127.0.0.1:1", [0], 2, SimConfig(devices_per_host=1))
    reporting, silent = _silent_host(True), _silent_host(False)
    for i, host in enumerate((reporting, silent)):
        host.island, host.host, host.report_soon = 0, i, host.report
        host.info = lambda i=i: i
        sim._registered_at[(0, i)] = time.monotonic()  # registered at start-up
    sim.hosts = [reporting, silent]

    async def watch() -> None:
        task = asyncio.get_running_loop().create_task(sim.keep_registered())
        await asyncio.sleep(1.5)
        task.cancel()

    asyncio.run(watch())
    assert reporting.asked >= 1 and silent.asked >= 1
    assert set(registered) == {1}  # only the host that could not report
