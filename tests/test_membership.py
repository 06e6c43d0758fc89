"""A host registers again when its controller restarts (runtime.worker.membership)."""

from __future__ import annotations

import time

import jax

from proto import auth as _auth
from runtime.server import Controller, create_controller_server
from runtime.worker.membership import Membership
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
