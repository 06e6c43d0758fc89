"""Session leases: a client that is killed, or exits without closing, leaves nothing behind."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import runtime
from proto.leases import SessionLeases

#: A client process: one slice, one 4 MB array, then it waits (idle) until it is killed.
CLIENT = textwrap.dedent("""
    import sys, time
    import numpy as np
    import runtime

    client = runtime.Client(sys.argv[1], name="doomed")
    s = client.slice({"d": 2})
    x = client.put(np.ones((1024, 1024), np.float32), s)
    client.sync()
    print("ready", flush=True)
    if sys.argv[2] == "exit":
        sys.exit(0)  # without close(): the client closes itself at interpreter exit
    time.sleep(600)
""")


def _start_client(address: str, token: str, mode: str) -> subprocess.Popen:
    env = dict(os.environ, PATHWAYS_TOKEN=token, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, address, mode], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    return proc


def _held(cluster) -> tuple[int, int, int, int]:
    """(sessions, arrays, slices, bytes stored on the hosts)."""
    status = cluster.controller.status_report.status()
    stored = sum(w.store.stats()[1] for w in cluster.workers)
    return status.sessions, status.arrays, len(status.slices), stored


def _wait_until_freed(cluster, deadline_s: float) -> float:
    started = time.monotonic()
    while _held(cluster) != (0, 0, 0, 0):
        assert time.monotonic() - started < deadline_s, f"still held: {_held(cluster)}"
        time.sleep(0.1)
    return time.monotonic() - started


def test_a_killed_client_is_freed_after_its_lease_and_a_live_idle_one_is_not(caplog):
    lease = 2.0
    with runtime.LocalCluster(islands=1, devices_per_island=2, session_lease_s=lease) as cluster:
        proc = _start_client(cluster.address, cluster.credentials.token, "wait")
        try:
            # Idle for three leases: its keepalive holds the session.
            time.sleep(3 * lease)
            sessions, arrays, slices, stored = _held(cluster)
            assert (sessions, arrays, slices) == (1, 1, 1) and stored >= 4 << 20
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        with caplog.at_level(logging.WARNING, logger="runtime.controller.controller"):
            # Within the lease and the reaper's period; the deadline is generous for a loaded
            # machine, and far below "forever", which is what a killed client used to hold.
            _wait_until_freed(cluster, deadline_s=lease + 60)
        assert cluster.controller.status_report.status().sessions_expired == 1
        assert any("'doomed'" in r.message and "not heard from" in r.message
                   and "freeing 1 arrays and 1 slices" in r.message
                   for r in caplog.records)


def test_a_client_that_exits_without_closing_closes_itself():
    # No lease: only the client's own close at interpreter exit can free its session.
    with runtime.LocalCluster(islands=1, devices_per_island=2, session_lease_s=0) as cluster:
        proc = _start_client(cluster.address, cluster.credentials.token, "exit")
        assert proc.wait(timeout=60) == 0
        _wait_until_freed(cluster, deadline_s=30)
        assert cluster.controller.status_report.status().sessions_expired == 0


def test_the_lease_is_configurable_and_reported():
    with runtime.LocalCluster(islands=1, devices_per_island=1, session_lease_s=7.5) as cluster:
        with runtime.Client(cluster.address, credentials=cluster.credentials) as client:
            assert client.lease_s == 7.5 and client.status().session_lease_s == 7.5
        assert client._closed
    with pytest.raises(ValueError):
        SessionLeases(-1, lambda *_: None)


def test_leases_run_out_only_for_silent_sessions_without_calls():
    leases = SessionLeases(0, lambda *_: None)  # no reaper thread: silent() is asked directly
    leases.lease_s = 10.0
    leases.open(1)
    leases.open(2)
    now = time.monotonic()
    assert leases.silent(now + 5) == []
    assert [sid for sid, _ in leases.silent(now + 11)] == [1, 2]
    with leases.call(1):  # a call in progress keeps its session however long it lasts
        assert [sid for sid, _ in leases.silent(now + 11)] == [2]
    leases.renew(2)
    renewed = time.monotonic()
    assert leases.silent(renewed + 9) == []  # the call's end renewed session 1 as well
    leases.end(2)
    assert [sid for sid, _ in leases.silent(renewed + 11)] == [1]
