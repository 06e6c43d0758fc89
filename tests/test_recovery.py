"""Failure detection: a worker process killed with SIGKILL is noticed within 2 s; work in flight or
queued on its island fails with an error naming the host; other islands keep working; no call
hangs."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import runtime


def test_sigkilled_worker_is_detected_and_its_work_fails():
    with runtime.ProcessCluster(islands=2, devices_per_host=2) as cluster:
        client = runtime.Client(cluster.address, **_client_kwargs(cluster))
        try:
            s0, s1 = client.slice({"d": 2}, island=0), client.slice({"d": 2}, island=1)
            step = client.jit(lambda v: v * 1.0001 + 1, s1)
            x = step(client.put(np.zeros(4096, np.float32), s1))
            x.fetch(timeout=60)  # compiled and running
            queued = [x := step(x) for _ in range(200)]
            os.kill(cluster.procs[1].pid, signal.SIGKILL)
            killed = time.monotonic()
            while not any(h.island == 1 and not h.alive for h in cluster.controller.resources.hosts()):
                assert time.monotonic() - killed < 2.0, "the lost host was not noticed within 2 s"
                time.sleep(0.02)
            noticed = time.monotonic() - killed
            start = time.monotonic()
            with pytest.raises(runtime.HostLostError, match=r"host 1\.0"):
                queued[-1].fetch(timeout=10)
            with pytest.raises(runtime.HostLostError, match=r"1\.0"):
                step(queued[-1]).fetch(timeout=10)
            with pytest.raises(runtime.HostLostError):
                client.slice({"d": 2}, island=1)
            assert time.monotonic() - start < 10, "a call on the lost island hung"
            f0 = client.jit(lambda v: v * 2, s0)
            np.testing.assert_array_equal(
                f0(client.put(np.ones(2, np.float32), s0)).fetch(timeout=60), [2, 2])
            # An idle island: only the heartbeat can notice.
            os.kill(cluster.procs[0].pid, signal.SIGKILL)
            killed = time.monotonic()
            while not any(h.island == 0 and not h.alive for h in cluster.controller.resources.hosts()):
                assert time.monotonic() - killed < 2.0, "an idle lost host was not noticed in 2 s"
                time.sleep(0.02)
            print(f"lost hosts noticed after {noticed:.2f} s (busy), "
                  f"{time.monotonic() - killed:.2f} s (idle)")
            with pytest.raises(runtime.HostLostError, match=r"host 0\.0"):
                f0(client.put(np.ones(2, np.float32), s0)).fetch(timeout=10)
        finally:
            client.close()


def _client_kwargs(cluster) -> dict:
    """Credentials of a cluster that has them (older clusters have none)."""
    credentials = getattr(cluster, "credentials", None)
    return {"credentials": credentials} if credentials is not None else {}
