"""SIGTERM always stops the runtime's processes: in order when they can, else after a grace period
(runtime.cli.common.Signalled), and a second signal at once. And `pathways up` stops after a hostile
client tried to keep it busy."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest

from proto import pathways_pb2 as pb

CLI = [sys.executable, "-m", "runtime.cli"]


def _stuck_after_signal(grace_s: float) -> subprocess.Popen:
    """A process that waits for a signal the way `pathways` commands do, then never finishes its
    shutdown (a thread that never returns, a lock never released)."""
    code = textwrap.dedent(f"""
        import threading
        from runtime.cli.common import Signalled
        stop = Signalled(grace_s={grace_s})
        print("ready", flush=True)
        stop.wait()
        print("stopping", flush=True)
        lock = threading.Lock()
        lock.acquire()
        while True:
            lock.acquire(timeout=1)  # never gets it
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_a_stuck_shutdown_ends_after_the_grace_period():
    proc = _stuck_after_signal(grace_s=1)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline() == "stopping\n"
        assert proc.wait(timeout=30) == -signal.SIGALRM
    finally:
        proc.kill()
        proc.wait()


def test_a_second_signal_ends_a_shutdown_at_once():
    proc = _stuck_after_signal(grace_s=600)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline() == "stopping\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_up_stops_on_sigterm_after_hostile_requests():
    """A declaration past the limit and a NaN wait on a host (which once span a thread forever and
    kept the worker from exiting) are refused; SIGTERM then stops `pathways up` and its workers."""
    import runtime

    port = _free_port()
    up = subprocess.Popen(CLI + ["up", "--islands", "1", "--devices-per-island", "2", "--port",
                                 str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=dict(os.environ, PATHWAYS_STOP_GRACE_S="20"))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            assert line, "pathways up exited early"
            if re.match(r"controller listening on", line):
                break
        with runtime.Client(f"127.0.0.1:{port}", name="hostile") as client:
            s = client.slice({"d": 2})
            pending = pb.ArraySpec(array_id=client._new_id(), dtype="float32", shape=[4],
                                   sharding=pb.Sharding(slice_id=s.slice_id))
            client.controller_stub.RegisterArrays(pb.RegisterArraysRequest(
                session_id=client.session_id, arrays=[pending]), timeout=30)
            worker = client.worker_stub(s.info.host_addresses[0])
            with pytest.raises(grpc.RpcError) as info:
                list(worker.GetArray(pb.GetArrayRequest(array_id=pending.array_id,
                                                        timeout_s=float("nan")), timeout=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            many = pb.RegisterArraysRequest(session_id=client.session_id, arrays=[
                pb.ArraySpec(array_id=client._new_id(), dtype="float32", shape=[1],
                             sharding=pb.Sharding(slice_id=s.slice_id)) for _ in range(12_000)])
            with pytest.raises(grpc.RpcError) as info:
                client.controller_stub.RegisterArrays(many, timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            x = client.put(np.arange(4, dtype=np.float32), s)
            np.testing.assert_array_equal(x.fetch(), np.arange(4, dtype=np.float32))
            assert all(h.state == "alive" for h in client.status().hosts)
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    assert code == 0
