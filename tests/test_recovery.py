"""Failure detection: a worker process killed with SIGKILL is noticed within 2 s; work in flight or
queued on its island fails with an error naming the host; other islands keep working; no call
hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax
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
            base = x
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
                step(base).fetch(timeout=10)
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


def _train(tmp_path, name: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "runtime.cli", "train", "--config", "palm-tiny", "--steps", "6",
           "--checkpoint-every", "2", "--checkpoint-dir", str(tmp_path / name), "--quiet", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.mark.slow
def test_train_survives_a_killed_worker(tmp_path):
    """`pathways train` with a worker SIGKILLed mid-run restarts the island, resumes from the last
    checkpoint, and ends with the parameters of an uninterrupted run, bit for bit."""
    clean = _train(tmp_path, "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    faulty = _train(tmp_path, "faulty", "--kill-worker-at-step", "3")
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    assert "fault injection: killing worker" in faulty.stderr
    assert "restarting its island" in faulty.stderr
    assert "resumed from step" in faulty.stdout
    assert_same_newest_checkpoint(tmp_path / "clean", tmp_path / "faulty", step=6)


def assert_same_newest_checkpoint(a_dir, b_dir, *, step: int) -> None:
    """Both directories' newest checkpoints are of `step` and hold the same state, bit for bit."""
    from model.checkpoint import read_latest

    (_, a_step, a), (_, b_step, b) = read_latest(a_dir), read_latest(b_dir)
    assert a_step == b_step == step
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_workers_outlive_a_controller_restart():
    """A restarted controller knows no hosts and no sessions: the workers register again by
    themselves; an old client gets a clear error; a new client works on every island."""
    from runtime.cluster.hosts import wait_for_hosts
    from runtime.worker.membership import SILENCE_S

    with runtime.ProcessCluster(islands=2, devices_per_host=1) as cluster:
        old = runtime.Client(cluster.address, credentials=cluster.credentials)
        s = old.slice({"d": 1}, island=1)
        x = old.put(np.arange(4, dtype=np.float32), s)
        np.testing.assert_array_equal(old.jit(lambda v: v + 1, s)(x).fetch(timeout=60),
                                      np.arange(4) + 1)
        cluster.restart_controller()
        restarted = time.monotonic()
        with pytest.raises(runtime.PathwaysError, match="restarted|connect again"):
            old.slice({"d": 1}, island=0)
        wait_for_hosts(cluster.controller, 2, SILENCE_S + 10)
        print(f"hosts registered again {time.monotonic() - restarted:.1f} s after the restart")
        with runtime.Client(cluster.address, credentials=cluster.credentials) as new:
            for island in (0, 1):
                s = new.slice({"d": 1}, island=island)
                y = new.jit(lambda v: v * 3, s)(new.put(np.ones(4, np.float32), s))
                np.testing.assert_array_equal(y.fetch(timeout=60), np.full(4, 3, np.float32))
        old.close()


def test_an_input_lost_on_one_host_of_an_island_hangs_it_and_a_restart_mends_it():
    """Host 1.1 stops while island 0 (two hosts) sums an array copied from island 1: host 1.0
    sends its half, so host 0.0 has its input and enters the sum's collective; host 0.1's half
    never comes and fails once the controller finds host 1.1 lost. Host 0.0 waits in the
    collective for good, and past its deadline reports the hang. `restart_lost_islands` then
    replaces both islands, the hung one as well as the one that lost a host."""
    from jax.sharding import PartitionSpec as P

    with runtime.ProcessCluster(islands=2, hosts_per_island=2, devices_per_host=2,
                                execution_deadline_s=2.0) as cluster:
        stopped = cluster.procs[3].pid  # host 1.1
        client = runtime.Client(cluster.address, **_client_kwargs(cluster))
        try:
            s0, s1 = client.slice({"d": 4}, island=0), client.slice({"d": 4}, island=1)
            total = client.jit(lambda v: jax.shard_map(lambda b: jax.lax.psum(b, "d"),
                                                       mesh=s0.mesh, in_specs=P("d"),
                                                       out_specs=P("d"))(v),
                               s0, in_specs=P("d"), out_specs=P("d"))
            x1 = client.put(np.arange(8, dtype=np.float32), s1, P("d"))
            np.testing.assert_array_equal(total(x1.to(s0)).fetch(timeout=60),
                                          np.tile([12, 16], 4))
            os.kill(stopped, signal.SIGSTOP)
            with pytest.raises((runtime.DeadlineExceededError, runtime.HostLostError)):
                total(x1.to(s0)).fetch(timeout=60)
            deadline = time.monotonic() + 60
            while not any(h.hang for h in client.status().hosts if h.island == 0):
                assert time.monotonic() < deadline, "island 0 did not report its hang"
                time.sleep(0.2)
            # A host that stopped answering is lost after BUSY_HOST_TIMEOUT_S (~10 s).
            while all(h.alive for h in cluster.controller.resources.island_hosts(1)):
                assert time.monotonic() < deadline, "host 1.1 was not found lost"
                time.sleep(0.2)
            assert cluster.restart_lost_islands() == [0, 1]
            for vslice in (client.slice({"d": 4}, island=0), client.slice({"d": 4}, island=1)):
                np.testing.assert_array_equal(
                    client.jit(lambda v: v * 2, vslice)(
                        client.put(np.ones(4, np.float32), vslice)).fetch(timeout=60), 2)
        finally:
            client.close()
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
